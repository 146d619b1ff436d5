"""WebRTC calls (`POST /v1/realtime/calls`) driven by an aiortc peer, as a browser would: an Opus
microphone track playing the fixtures at real time, the `oai-events` data channel, the server's
audio on the remote track. Every event is checked against the openai package's types."""

from __future__ import annotations

import asyncio
import fractions
import json
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.playout import FRAME_BYTES, SILENCE, Played, PlayoutBuffer, Started, Stopped
from server.settings import ServerSettings

from .conftest import fixture_audio
from .openai_events import check_server_event
from .test_server import Running, start_server, stop_server

aiortc = pytest.importorskip("aiortc")
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack  # noqa: E402


def _host_addresses() -> list[str]:
    from aioice.ice import get_host_addresses

    return get_host_addresses(use_ipv4=True, use_ipv6=True)


# aioice never offers 127.0.0.1: both peers meet on another interface of this machine.
needs_interface = pytest.mark.skipif(not _host_addresses(), reason="no non-loopback network interface for ICE")

KEY = "rtc-key"
MIC_RATE = 48000
FRAME = MIC_RATE // 50  # 20 ms
TEST_TIMEOUT = 90


# ---------------- the playout buffer, sans-I/O ----------------


def test_playout_buffer_paces_reports_and_clears() -> None:
    b = PlayoutBuffer(max_bytes=FRAME_BYTES * 100, report_every_ms=100)
    assert b.next_frame() == (SILENCE, [])
    b.push("r1", b"\x01\x00" * (FRAME_BYTES // 2 * 7 // 2))  # 3.5 frames
    frames = [b.next_frame() for _ in range(3)]
    assert frames[0][1] == [Started("r1")] and all(f[0] != SILENCE for f in frames)
    b.end("r1")
    last, events = b.next_frame()  # half a frame of audio, half of silence, then the end
    assert (
        last[: FRAME_BYTES // 2] != SILENCE[: FRAME_BYTES // 2]
        and last[FRAME_BYTES // 2 :] == SILENCE[: FRAME_BYTES // 2]
    )
    assert events == [Played("r1", 70.0), Stopped("r1")] and not b.active
    b.push("r2", bytes(FRAME_BYTES * 10))
    for _ in range(5):
        b.next_frame()
    assert b.clear() == Played("r2", 100.0) and b.next_frame() == (SILENCE, []) and b.clear() is None
    b.push("r3", bytes(FRAME_BYTES * 101))  # over the bound: refused, counted
    assert b.dropped_bytes == FRAME_BYTES * 101 and b.queued_ms == 0


# ---------------- a call, end to end ----------------


class Mic(MediaStreamTrack):
    """A microphone at real time: what `say` queued, then silence; `mute()` stops sending RTP."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pcm = np.zeros(0, np.int16)
        self._start: float | None = None
        self._pts = 0
        self.muted = False

    def say(self, audio16k: np.ndarray) -> None:
        import soxr

        audio48 = soxr.resample(audio16k.astype(np.float32), 16000, MIC_RATE)
        pcm = np.clip(np.round(audio48 * 32767), -32768, 32767).astype(np.int16)
        self._pcm = np.concatenate([self._pcm, pcm])

    @property
    def busy(self) -> bool:
        return self._pcm.size > 0

    async def recv(self) -> Any:
        import av

        while self.muted:
            await asyncio.sleep(0.05)
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += FRAME
            await asyncio.sleep(max(0.0, self._start + self._pts / MIC_RATE - time.monotonic()))
        chunk, self._pcm = self._pcm[:FRAME], self._pcm[FRAME:]
        chunk = np.concatenate([chunk, np.zeros(FRAME - chunk.size, np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = MIC_RATE, self._pts, fractions.Fraction(1, MIC_RATE)
        return frame


class Peer:
    """The browser side of a call."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = Mic()
        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("oai-events")
        self.events: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.extensions = False
        self.heard: deque[tuple[float, float]] = deque(maxlen=20000)  # (time, rms) of each remote frame
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)
        self._reader: asyncio.Task[None] | None = None

    def _on_message(self, message: str) -> None:
        ev = json.loads(message)
        check_server_event(ev, self.extensions)
        ev["_t"] = time.monotonic()
        self.events.append(ev)
        self.arrived.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        async def read() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                x = frame.to_ndarray().astype(np.float32) / 32768
                self.heard.append((time.monotonic(), float(np.sqrt(np.mean(x * x)))))

        self._reader = asyncio.get_running_loop().create_task(read())

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    def send(self, event: dict[str, Any]) -> None:
        self.channel.send(json.dumps(event))

    async def until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        """The first event (from the start of the call) that matches and was not matched before."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if pred(ev) and not ev.get("_used"):
                    ev["_used"] = True
                    return ev
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; got {[e['type'] for e in self.events][-40:]}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                pass

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.pc.close()


def of_type(*names: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] in names


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[Running]:
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, api_key=KEY, max_sessions=2, dtype="float32",
                                    interrupt_detector=False, turn_model=False, rtc_connect_timeout_s=3,
                                    rtc_silence_timeout_s=3, log_level="warning"))  # fmt: skip
    yield r
    stop_server(r)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT))


def base(server: Running) -> str:
    return f"http://127.0.0.1:{server.port}"


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status_code, self.headers, self.text = status, headers, body.decode()


def _post(url: str, body: bytes, headers: dict[str, str]) -> Answer:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return Answer(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, e.headers, e.read())


async def post(url: str, body: bytes | str = b"", **headers: str) -> Answer:
    data = body.encode() if isinstance(body, str) else body
    return await asyncio.to_thread(_post, url, data, {k.replace("_", "-"): v for k, v in headers.items()})


async def post_offer(server: Running, sdp: str, token: str = KEY) -> Answer:
    return await post(f"{base(server)}/v1/realtime/calls", sdp, Authorization=f"Bearer {token}",
                      Content_Type="application/sdp")  # fmt: skip


def free_slots(server: Running) -> int:
    try:
        return int(json.loads(urllib.request.urlopen(base(server) + "/readyz", timeout=5).read())["free_slots"])
    except urllib.error.HTTPError as e:  # 503: none free
        return int(json.loads(e.read())["free_slots"])


async def wait_free(server: Running, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(free_slots, server) == n and not server.engine.calls:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"slots not freed: {free_slots(server)} free, calls {list(server.engine.calls)}")


def rms_between(peer: Peer, t0: float, t1: float) -> list[float]:
    return [r for t, r in list(peer.heard) if t0 <= t <= t1]


@needs_interface
def test_a_voice_turn_over_webrtc(server: Running) -> None:
    """The SDK's multipart call (sdp + session), a spoken question, the answer on the remote track."""
    from openai import AsyncOpenAI

    async def main() -> Peer:
        peer = Peer()
        client = AsyncOpenAI(api_key=KEY, base_url=f"{base(server)}/v1", max_retries=0)
        session = {"type": "realtime", "model": "gpt-realtime", "max_output_tokens": 40}
        raw = await client.realtime.calls.with_raw_response.create(sdp=await peer.offer(), session=session)
        assert raw.http_response.status_code == 201 and raw.headers["content-type"].startswith("application/sdp")
        location = raw.headers["location"]
        call_id = location.rsplit("/", 1)[-1]
        assert location == f"/v1/realtime/calls/{call_id}" and call_id.startswith("rtc_")
        await peer.answer(raw.http_response.text)
        created = await peer.until(of_type("session.created"), 10)
        assert created["session"]["max_output_tokens"] == 40  # the form's session config, applied before
        assert await asyncio.to_thread(free_slots, server) == 1
        peer.mic.say(np.concatenate([np.zeros(8000, np.float32), fixture_audio("question"),
                                     np.zeros(24000, np.float32)]))  # fmt: skip
        done = await peer.until(of_type("response.done"), 40)
        assert done["response"]["status"] in ("completed", "incomplete")  # incomplete: the 40-token budget
        stopped = await peer.until(of_type("output_audio_buffer.stopped"), 10)
        started = next(e for e in peer.events if e["type"] == "output_audio_buffer.started")
        assert started["response_id"] == stopped["response_id"] == done["response"]["id"]
        await asyncio.sleep(0.3)
        # The answer played on the track, at real time, then silence.
        playing = rms_between(peer, started["_t"], stopped["_t"])
        assert len(playing) >= 0.8 * (stopped["_t"] - started["_t"]) * 50 and max(playing) > 0.01
        assert sum(r > 0.003 for r in playing) > 0.5 * len(playing)
        assert all(r < 0.003 for r in rms_between(peer, stopped["_t"] + 0.2, time.monotonic()))
        await client.realtime.calls.hangup(call_id)
        await wait_free(server, 2)
        await peer.close()
        return peer

    peer = run(main())
    names = peer.types()
    order = ["session.created", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "response.created", "response.content_part.added",
             "output_audio_buffer.started", "response.done", "output_audio_buffer.stopped"]  # fmt: skip
    at = [names.index(n) for n in order]
    assert at == sorted(at), names
    assert "response.output_audio.delta" not in names  # the audio went on the track (as OpenAI over WebRTC)
    assert "response.output_audio_transcript.delta" in names


@needs_interface
def test_barge_in_with_a_client_secret(server: Running) -> None:
    """A client secret (vad interrupt mode in its config) opens the call; "stop omni" while the
    answer plays clears the output audio at once and cancels the response."""
    from openai import OpenAI

    secret = OpenAI(api_key=KEY, base_url=f"{base(server)}/v1", max_retries=0).realtime.client_secrets.create(
        session={"type": "realtime", "omnivox": {"interrupt_mode": "vad", "max_audio_lead_ms": 600}}
    )

    async def main() -> Peer:
        peer = Peer()
        peer.extensions = True  # the secret's config asked for omnivox options
        offer = await peer.offer()
        for token in ("wrong", "ek_" + "12" * 24):
            assert (await post_offer(server, offer, token)).status_code == 401
        resp = await post_offer(server, offer, secret.value)
        assert resp.status_code == 201
        assert (await post_offer(server, offer, secret.value)).status_code == 401  # used up
        await peer.answer(resp.text)
        created = await peer.until(of_type("session.created"), 10)
        assert created["session"]["id"] == secret.session.id
        assert created["session"]["omnivox"]["interrupt_mode"] == "vad"
        peer.mic.say(np.concatenate([np.zeros(8000, np.float32), fixture_audio("question"),
                                     np.zeros(16000, np.float32)]))  # fmt: skip
        started = await peer.until(of_type("output_audio_buffer.started"), 40)
        rid = started["response_id"]
        await asyncio.sleep(1.0)  # the answer plays a while
        peer.mic.say(np.concatenate([fixture_audio("stop_omni"), np.zeros(16000, np.float32)]))
        cleared = await peer.until(of_type("output_audio_buffer.cleared"), 15)
        assert cleared["response_id"] == rid
        done = await peer.until(lambda e: e["type"] == "response.done" and e["response"]["id"] == rid, 10)
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "turn_detected"
        await asyncio.sleep(0.6)
        # The audio stopped at once: nothing but silence reached the peer shortly after the clear.
        after = rms_between(peer, cleared["_t"] + 0.15, cleared["_t"] + 0.6)
        assert after and max(after) < 0.003, after
        before = rms_between(peer, started["_t"], cleared["_t"] - 0.1)
        assert max(before) > 0.01
        # Closing the peer connection ends the session and frees the slot.
        await peer.close()
        await wait_free(server, 2)
        return peer

    peer = run(main())
    names = peer.types()
    i = names.index("output_audio_buffer.cleared")
    assert "input_audio_buffer.speech_started" in names[names.index("output_audio_buffer.started") : i + 1]
    assert "output_audio_buffer.stopped" not in names[i:]


@needs_interface
def test_a_call_that_never_connects_frees_its_slot(server: Running) -> None:
    async def main() -> None:
        peer = Peer()
        resp = await post_offer(server, await peer.offer())
        assert resp.status_code == 201  # the answer is never applied: no ICE, no DTLS
        assert await asyncio.to_thread(free_slots, server) == 1
        await wait_free(server, 2, timeout=8)  # rtc_connect_timeout_s is 3 s here
        await peer.close()

    run(main())


@needs_interface
def test_a_silent_peer_is_hung_up_and_hangup_needs_the_key(server: Running) -> None:
    async def main() -> None:
        peer = Peer()
        resp = await post_offer(server, await peer.offer())
        call_id = resp.headers["location"].rsplit("/", 1)[-1]
        await peer.answer(resp.text)
        await peer.until(of_type("session.created"), 10)
        url = f"{base(server)}/v1/realtime/calls/{call_id}/hangup"
        assert (await post(url, Authorization="Bearer wrong")).status_code == 401
        other = url.replace(call_id, call_id + "x")
        assert (await post(other, Authorization=f"Bearer {KEY}")).status_code == 404
        peer.mic.muted = True  # no RTP any more
        t0 = time.monotonic()
        await wait_free(server, 2, timeout=10)  # rtc_silence_timeout_s is 3 s here
        assert time.monotonic() - t0 >= 2.0
        await peer.close()

    run(main())


def test_bad_offers(server: Running) -> None:
    import openai

    async def main() -> None:
        url = f"{base(server)}/v1/realtime/calls"
        auth = f"Bearer {KEY}"
        assert (await post(url, "hello", Authorization=auth, Content_Type="application/sdp")).status_code == 400
        assert (await post(url, "{}", Authorization=auth, Content_Type="application/json")).status_code == 415
        assert (await post(url, "v=0\r\n", Content_Type="application/sdp")).status_code == 401
        peer = Peer()
        client = openai.AsyncOpenAI(api_key=KEY, base_url=f"{base(server)}/v1", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:  # multipart, as the SDK sends it
            await client.realtime.calls.create(
                sdp=await peer.offer(), session={"type": "realtime", "output_modalities": ["video"]}
            )
        assert info.value.status_code == 400 and "session" in str(info.value)
        await peer.close()
        assert await asyncio.to_thread(free_slots, server) == 2

    run(main())


@needs_interface
def test_output_audio_buffer_clear_and_the_hangup_endpoint(server: Running) -> None:
    """A text turn answered on the track; the client's output_audio_buffer.clear stops it at once
    (and its generation); the SDK's hangup ends the call and frees the slot."""
    from openai import AsyncOpenAI

    async def main() -> Peer:
        peer = Peer()
        resp = await post_offer(server, await peer.offer())
        call_id = resp.headers["location"].rsplit("/", 1)[-1]
        await peer.answer(resp.text)
        await peer.until(of_type("session.created"), 10)
        # Audio at most 200 ms ahead of playback: generation is still running when the clear comes.
        peer.extensions = True
        peer.send({"type": "session.update", "session": {"type": "realtime", "omnivox": {"max_audio_lead_ms": 200}}})
        await peer.until(of_type("session.updated"), 10)
        content = [{"type": "input_text", "text": "Tell me a long story."}]
        peer.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": content}})
        peer.send({"type": "response.create"})
        started = await peer.until(of_type("output_audio_buffer.started"), 20)
        await asyncio.sleep(0.8)
        peer.send({"type": "output_audio_buffer.clear", "event_id": "clear_1"})
        cleared = await peer.until(of_type("output_audio_buffer.cleared"), 5)
        done = await peer.until(of_type("response.done"), 5)
        assert cleared["response_id"] == started["response_id"] == done["response"]["id"]
        assert done["response"]["status"] == "cancelled"
        await asyncio.sleep(0.6)
        assert max(rms_between(peer, cleared["_t"] + 0.15, cleared["_t"] + 0.6)) < 0.003
        client = AsyncOpenAI(api_key=KEY, base_url=f"{base(server)}/v1", max_retries=0)
        await client.realtime.calls.hangup(call_id)
        await wait_free(server, 2)
        await peer.close()
        return peer

    names = run(main()).types()
    assert "error" not in names, names
