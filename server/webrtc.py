"""WebRTC calls (`POST /v1/realtime/calls`), as OpenAI's browser flow: an SDP offer in, an SDP
answer out; audio both ways on one Opus track; the realtime events on the `oai-events` data
channel. Behind it the same `Connection` as the WebSocket, over `RtcTransport`.

aiortc runs on the event loop (Opus encode/decode run in its own threads). Input audio: the
peer's 48 kHz Opus, decoded by aiortc, resampled here to 24 kHz mono PCM16 in 20 ms frames
(cheap) and handed to the session like any appended audio. Output audio: the session's 24 kHz
PCM goes to `OutputTrack`, which plays it out at real time in 20 ms frames (silence when idle)
and tells the connection what has been played.

A call ends when it is hung up, when its data channel or peer connection closes or fails, when
no RTP comes for `rtc_silence_timeout_s`, or when it does not come up within
`rtc_connect_timeout_s`.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import av
from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .playout import FRAME_SAMPLES, RATE, Played, PlayoutBuffer, PlayoutEvent
from .protocol import SessionIn
from .realtime import Connection
from .transport import MEDIA_INPUT_RATE, Incoming, MediaAudio, Player

if TYPE_CHECKING:
    from .app import Engine

log = logging.getLogger("omnivox.server")

EVENTS_CHANNEL = "oai-events"
INBOX_FRAMES = 500  # 10 s of 20 ms input frames, plus events, waiting for the session
MAX_PLAYOUT_S = 60  # output audio held for the track; the runner's pacing keeps it near max_audio_lead_ms
SEND_HIGH_WATER = 1 << 20  # bytes the data channel may hold before a send waits
RESYNC_S = 0.2  # the loop was held up longer than this: the output clock skips instead of bursting


class CallError(ValueError):
    pass


class OutputTrack(MediaStreamTrack):
    """The server's audio track: 20 ms frames of the playout buffer at real time."""

    kind = "audio"

    def __init__(self, buffer: PlayoutBuffer) -> None:
        super().__init__()
        self.buffer = buffer
        self._listener: Callable[[PlayoutEvent], None] | None = None
        self._start: float | None = None
        self._pts = 0

    # Player (the connection's side)
    @property
    def response_id(self) -> str | None:
        return self.buffer.response_id

    def push(self, response_id: str, pcm: bytes) -> None:
        self.buffer.push(response_id, pcm)

    def end(self, response_id: str) -> None:
        self.buffer.end(response_id)

    def clear(self) -> Played | None:
        return self.buffer.clear()

    def listen(self, listener: Callable[[PlayoutEvent], None]) -> None:
        self._listener = listener

    # MediaStreamTrack (aiortc's sender pulls one frame at a time)
    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._pts += FRAME_SAMPLES
            wait = self._start + self._pts / RATE - now
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -RESYNC_S:
                self._start = now - self._pts / RATE
        pcm, events = self.buffer.next_frame()
        if self._listener is not None:
            for event in events:
                try:
                    self._listener(event)
                except Exception:  # the connection's fault must not stop the track
                    log.exception("a playout event failed")
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm)
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


class RtcTransport:
    """A `Transport` over one RTCPeerConnection: events on `oai-events`, audio on the track."""

    def __init__(self, pc: RTCPeerConnection, call_id: str, silence_timeout_s: float, expects_channel: bool) -> None:
        self.pc = pc
        self.call_id = call_id
        self.silence_timeout_s = silence_timeout_s
        self.expects_channel = expects_channel
        self.track = OutputTrack(PlayoutBuffer(MAX_PLAYOUT_S * RATE * 2))
        self.ended: str | None = None  # why the call ended
        self.dropped_frames = 0
        self._inbox: asyncio.Queue[Incoming | None] = asyncio.Queue(maxsize=INBOX_FRAMES)
        self._stash: Incoming | None = None
        self._channel: RTCDataChannel | None = None
        self._ready = asyncio.Event()
        self._gone = asyncio.Event()
        self._drained = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        pc.on("datachannel", self._on_datachannel)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_state)

    @property
    def player(self) -> Player:
        return self.track

    # ---------------- coming up ----------------

    async def wait_ready(self, timeout_s: float) -> bool:
        """Until the call can carry events (or, without a data channel, audio); False: it ended or
        did not come up in time."""
        ready = asyncio.ensure_future(self._ready.wait())
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({ready, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            gone.cancel()
        if self._gone.is_set():
            return False
        if not self._ready.is_set():
            self._end(f"the call did not connect within {timeout_s:g} s")
            return False
        return True

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_CHANNEL or self._channel is not None:
            return  # OpenAI's flow has one events channel; others are ignored
        self._channel = channel
        channel.bufferedAmountLowThreshold = SEND_HIGH_WATER // 2
        channel.on("message", self._on_message)
        channel.on("close", lambda: self._end("the data channel closed"))
        channel.on("bufferedamountlow", self._drained.set)
        if channel.readyState == "open":
            self._ready.set()
        else:
            channel.on("open", self._ready.set)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_audio(track))

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and not self.expects_channel:
            self._ready.set()
        elif state in ("failed", "closed"):
            self._end(f"the peer connection {state}")

    # ---------------- input ----------------

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=MEDIA_INPUT_RATE)
        while self.ended is None:
            try:
                frame = await asyncio.wait_for(track.recv(), self.silence_timeout_s)
            except TimeoutError:
                self._end(f"no audio from the peer for {self.silence_timeout_s:g} s")
                return
            except MediaStreamError:
                self._end("the peer's audio track ended")
                return
            pcm = b"".join(f.to_ndarray().tobytes() for f in resampler.resample(frame))  # type: ignore[arg-type]
            if self._inbox.full():
                self.dropped_frames += 1  # the session is behind: audio is dropped, not queued without end
                if self.dropped_frames == 1:
                    log.warning("call %s: input audio dropped (the session is behind)", self.call_id)
                continue
            self._inbox.put_nowait(MediaAudio(pcm))

    def _on_message(self, message: str | bytes) -> None:
        if self.ended is not None:
            return
        if self._inbox.full():
            self._end("the client sends events faster than the session takes them")
            return
        self._inbox.put_nowait(message)

    async def receive(self) -> Incoming | None:
        if self._stash is not None:
            stashed, self._stash = self._stash, None
            return stashed
        item = await self._inbox.get()
        if not isinstance(item, MediaAudio):
            return item
        # Audio that waited is handed over in one piece (one worker call for all of it).
        pieces = [item.pcm]
        while not self._inbox.empty() and len(pieces) < 25:
            nxt = self._inbox.get_nowait()
            if not isinstance(nxt, MediaAudio):
                self._stash = nxt
                break
            pieces.append(nxt.pcm)
        return MediaAudio(b"".join(pieces)) if len(pieces) > 1 else item

    # ---------------- output ----------------

    async def send_text(self, text: str) -> None:
        await self._send(text)

    async def send_bytes(self, data: bytes) -> None:
        await self._send(data)

    async def _send(self, data: str | bytes) -> None:
        ch = self._channel
        if ch is None or ch.readyState != "open":
            return  # no events channel (audio-only call) or it is closing: nothing to send to
        while ch.bufferedAmount > SEND_HIGH_WATER:  # the peer reads slowly: wait (the watchdog bounds it)
            self._drained.clear()
            await self._drained.wait()
        ch.send(data)

    # ---------------- the end ----------------

    def _end(self, why: str) -> None:
        if self.ended is not None:
            return
        self.ended = why
        log.info("call %s ends: %s", self.call_id, why)
        self._gone.set()
        while not self._inbox.empty():  # what waits is dropped: the session ends now
            self._inbox.get_nowait()
        self._stash = None
        self._inbox.put_nowait(None)

    async def close(self, code: int = 1000, reason: str = "call ended") -> None:
        self._end(reason)
        if self._reader is not None:
            self._reader.cancel()
        self.track.stop()
        await self.pc.close()


class RtcCall:
    def __init__(self, call_id: str, transport: RtcTransport, conn: Connection) -> None:
        self.call_id = call_id
        self.transport = transport
        self.conn = conn
        self.task: asyncio.Task[None] | None = None

    async def hangup(self) -> None:
        await self.transport.close(1000, "hung up")


def ice_configuration(ice_servers: list[dict[str, Any]]) -> RTCConfiguration:
    # An empty list, not aiortc's default: that would ask Google's STUN server on every call.
    return RTCConfiguration(iceServers=[RTCIceServer(**s) for s in ice_servers])


async def open_call(
    engine: Engine, call_id: str, offer_sdp: str, session_id: str, initial: list[SessionIn]
) -> tuple[RtcCall, str]:
    """Answer the offer; returns the call (not yet running) and the SDP answer."""
    settings = engine.settings
    pc = RTCPeerConnection(ice_configuration([s.model_dump(exclude_none=True) for s in settings.ice_servers]))
    transport = RtcTransport(pc, call_id, settings.rtc_silence_timeout_s, "m=application" in offer_sdp)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        if not any(t.kind == "audio" for t in pc.getTransceivers()):
            raise CallError("the offer has no audio media section")
        pc.addTrack(transport.track)  # on the offer's audio transceiver: one track both ways
        await pc.setLocalDescription(await pc.createAnswer())
    except CallError:
        await pc.close()
        raise
    except Exception as e:  # aiortc's parse and negotiation errors: the offer's fault
        await pc.close()
        raise CallError(f"cannot answer this SDP offer: {e}") from None
    conn = Connection(transport, engine, session_id, initial)
    return RtcCall(call_id, transport, conn), pc.localDescription.sdp
