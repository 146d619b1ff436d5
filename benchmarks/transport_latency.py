"""`omnivox bench latency --transport websocket,webrtc`: the latency a client sees through a real
`omnivox serve` (in this process, on 127.0.0.1), over the WebSocket and over a WebRTC call, side by
side, with the default command barge-in ("stop omni").

A scripted user speaks at real-time pace: over the WebSocket as 20 ms `input_audio_buffer.append`
chunks of 24 kHz PCM; over WebRTC as an Opus microphone track (aiortc peer, 48 kHz, 20 ms frames).
We time on the client's wall clock:
- ttfa_ms: from sending the question's last speech sample to the first answer audio the client
  has: the first `response.output_audio.delta` (WebSocket), or the first non-silent frame decoded
  from the server's track (WebRTC: includes Opus both ways, the jitter buffer and the server's
  real-time playout clock);
- barge_in_ms: from sending the command's last speech sample to the `input_audio_buffer.speech_started`
  that confirms the interrupt (clients stop playback on it);
- WebRTC only, audio_stop_ms: from the command's end to the last non-silent frame of the answer on
  the track (the server drops its queued audio at the interrupt), and started_ms: first audio
  frame heard minus `output_audio_buffer.started`.
"""

from __future__ import annotations

import asyncio
import base64
import fractions
import json
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from model.audio import load_audio_file
from server.serve import build_engine, start_in_thread
from server.settings import ServerSettings

from .latency import speech_end
from .machine import machine_info

LOUD = 0.003  # RMS of a frame that carries audio (decoded digital silence is ~0)
FRAME_S = 0.02


def _pcm16(audio: np.ndarray) -> bytes:
    return np.clip(np.round(audio * 32767), -32768, 32767).astype("<i2").tobytes()


class _Turns:
    """Events with their arrival times; wait for one (bounded)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.arrived = asyncio.Event()

    def add(self, ev: dict[str, Any]) -> None:
        self.events.append((time.monotonic(), ev))
        self.arrived.set()

    async def first(self, pred: Any, after: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while True:
            for t, ev in self.events:
                if t >= after and pred(ev):
                    return t
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                pass


def _is(kind: str) -> Any:
    return lambda e: e.get("type") == kind


async def _websocket_turn(port: int, user: np.ndarray, q_end: int, command: np.ndarray, c_end: int) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    turns = _Turns()
    async with connect(f"ws://127.0.0.1:{port}/v1/realtime", max_size=None) as ws:

        async def read() -> None:
            async for msg in ws:
                if isinstance(msg, str):
                    turns.add(json.loads(msg))

        reader = asyncio.create_task(read())
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 400}}))
        step = int(24000 * FRAME_S)
        t0 = time.monotonic()
        sent: dict[str, float] = {}

        async def speak(audio24: np.ndarray, start_sample: int, marks: dict[int, str]) -> None:
            for i in range(0, audio24.size, step):
                at = t0 + (start_sample + i) / 24000
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                chunk = base64.b64encode(_pcm16(audio24[i : i + step])).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                for sample, name in marks.items():
                    if i <= sample < i + step and name not in sent:
                        sent[name] = time.monotonic()

        # the question, then a quiet microphone until the first audio, then the command
        await speak(user, 0, {q_end: "spoken"})
        n = user.size
        t_audio = None
        while t_audio is None and time.monotonic() - t0 < 60 + n / 24000:
            await speak(np.zeros(step * 5, np.float32), n, {})
            n += step * 5
            t_audio = await turns.first(_is("response.output_audio.delta"), 0, 0)
        t_cmd = time.monotonic()
        await speak(command, n, {c_end: "command"})
        await speak(np.zeros(int(24000 * 0.8), np.float32), n + command.size, {})
        t_int = await turns.first(_is("input_audio_buffer.speech_started"), t_cmd, 10)
        reader.cancel()
    return {
        "ttfa_ms": _ms(t_audio, sent.get("spoken")),
        "barge_in_ms": _ms(t_int, sent.get("command")),
    }


async def _webrtc_turn(port: int, user48: np.ndarray, q_end: int, command48: np.ndarray, c_end: int) -> dict[str, Any]:
    import av
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    frame = int(48000 * FRAME_S)

    class Mic(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.pcm = np.zeros(0, np.int16)
            self.start: float | None = None
            self.pts = 0
            self.enqueued = 0  # samples ever queued by say()
            self.consumed = 0  # of those, samples sent
            self.marks: dict[int, str] = {}  # queue index -> name, timed when that sample is sent
            self.sent: dict[str, float] = {}

        def say(self, audio48: np.ndarray, mark: tuple[int, str]) -> None:
            self.marks[self.enqueued + mark[0]] = mark[1]
            self.pcm = np.concatenate([self.pcm, np.frombuffer(_pcm16(audio48), "<i2")])
            self.enqueued += audio48.size

        async def recv(self) -> av.AudioFrame:
            if self.start is None:
                self.start = time.monotonic()
            else:
                self.pts += frame
                await asyncio.sleep(max(0.0, self.start + self.pts / 48000 - time.monotonic()))
            chunk, self.pcm = self.pcm[:frame], self.pcm[frame:]
            self.consumed += chunk.size
            for index in [i for i in self.marks if i < self.consumed]:
                self.sent[self.marks.pop(index)] = time.monotonic()
            chunk = np.concatenate([chunk, np.zeros(frame - chunk.size, np.int16)])
            f = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            f.sample_rate, f.pts, f.time_base = 48000, self.pts, fractions.Fraction(1, 48000)
            return f

    turns = _Turns()
    heard: list[tuple[float, float]] = []
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    mic = Mic()
    pc.addTrack(mic)
    channel = pc.createDataChannel("oai-events")
    channel.on("message", lambda m: turns.add(json.loads(m)))
    readers: list[asyncio.Task[None]] = []

    def on_track(track: MediaStreamTrack) -> None:
        async def read() -> None:
            while True:
                try:
                    f = await track.recv()
                except MediaStreamError:
                    return
                assert isinstance(f, av.AudioFrame)
                x = f.to_ndarray().astype(np.float32) / 32768
                heard.append((time.monotonic(), float(np.sqrt(np.mean(x * x)))))

        readers.append(asyncio.get_running_loop().create_task(read()))

    pc.on("track", on_track)
    await pc.setLocalDescription(await pc.createOffer())
    session = json.dumps({"type": "realtime", "max_output_tokens": 400})
    answer = await asyncio.to_thread(_post_call, port, pc.localDescription.sdp, session)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    try:
        if await turns.first(_is("session.created"), 0, 15) is None:
            raise RuntimeError("the call did not come up")
        t_start = time.monotonic()
        mic.say(user48, (q_end, "spoken"))
        t_audio = None
        while t_audio is None and time.monotonic() - t_start < 60 + user48.size / 48000:
            await asyncio.sleep(0.01)
            t_audio = next((t for t, r in heard if t >= t_start and r > LOUD), None)
        t_cmd = time.monotonic()
        mic.say(command48, (c_end, "command"))
        t_int = await turns.first(_is("input_audio_buffer.speech_started"), t_cmd, 10)
        await asyncio.sleep(1.0)
        t_started = await turns.first(_is("output_audio_buffer.started"), 0, 0)
        loud_after = [t for t, r in heard if t >= t_cmd and r > LOUD]
        return {
            "ttfa_ms": _ms(t_audio, mic.sent.get("spoken")),
            "barge_in_ms": _ms(t_int, mic.sent.get("command")),
            "audio_stop_ms": _ms(loud_after[-1] if loud_after else None, mic.sent.get("command")),
            "started_ms": _ms(t_audio, t_started),
        }
    finally:
        for r in readers:
            r.cancel()
        await pc.close()


def _post_call(port: int, sdp: str, session: str) -> str:
    boundary = "omnivoxbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"sdp\"\r\nContent-Type: application/sdp\r\n\r\n"
            f"{sdp}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"session\"\r\n"
            f"Content-Type: application/json\r\n\r\n{session}\r\n--{boundary}--\r\n")  # fmt: skip
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/realtime/calls", data=body.encode(), method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        answer: str = r.read().decode()
        return answer


def _ms(t: float | None, t0: float | None) -> float | None:
    return None if t is None or t0 is None else round((t - t0) * 1000, 1)


def bench_transport_latency(
    checkpoint: str | Path,
    question_wav: Path,
    command_wav: Path,
    *,
    dtype: str = "float32",
    runs: int = 3,
    device: str = "cpu",
    transports: tuple[str, ...] = ("websocket", "webrtc"),
) -> dict[str, Any]:
    spec = Path(checkpoint)
    where: dict[str, Any] = {"checkpoint_dir": spec} if spec.exists() else {"checkpoint": str(checkpoint)}
    settings = ServerSettings(port=0, max_sessions=2, dtype=dtype, device=device, turn_model=False,
                              log_level="warning", **where)  # fmt: skip
    engine = build_engine(settings)
    server, thread, port = start_in_thread(engine)
    question, command = load_audio_file(question_wav), load_audio_file(command_wav)
    lead = np.zeros(int(0.3 * 16000), np.float32)
    user16 = np.concatenate([lead, question])
    q_end16, c_end16 = lead.size + speech_end(question), speech_end(command)
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(runs):
            for transport in transports:
                if transport == "websocket":
                    user24 = soxr.resample(user16, 16000, 24000).astype(np.float32)
                    cmd24 = soxr.resample(command, 16000, 24000).astype(np.float32)
                    coro = _websocket_turn(port, user24, q_end16 * 3 // 2, cmd24, c_end16 * 3 // 2)
                elif transport == "webrtc":
                    user48 = soxr.resample(user16, 16000, 48000).astype(np.float32)
                    cmd48 = soxr.resample(command, 16000, 48000).astype(np.float32)
                    coro = _webrtc_turn(port, user48, q_end16 * 3, cmd48, c_end16 * 3)
                else:
                    raise ValueError(f"unknown transport {transport!r} (websocket, webrtc)")
                row = asyncio.run(asyncio.wait_for(coro, 120))
                rows.append({"transport": transport, **row})
                deadline = time.monotonic() + 10  # the session has left before the next one
                while engine.connections and time.monotonic() < deadline:
                    time.sleep(0.05)
    finally:
        server.should_exit = True
        thread.join(15)
        engine.close()

    def med(transport: str, key: str) -> float | None:
        vals = [r[key] for r in rows if r["transport"] == transport and r.get(key) is not None]
        return round(statistics.median(vals), 1) if vals else None

    keys = ("ttfa_ms", "barge_in_ms", "audio_stop_ms", "started_ms")
    return {
        "benchmark": "latency_transport",
        "checkpoint": str(checkpoint),
        "model": engine.model.config.name,
        "dtype": dtype,
        "question_wav": str(question_wav),
        "command_wav": str(command_wav),
        "interrupt_mode": "command",
        "runs": rows,
        "median": {
            t: {k: med(t, k) for k in keys if any(k in r for r in rows if r["transport"] == t)} for t in transports
        },
        "machine": machine_info(device),
    }


def print_transport_latency(result: dict[str, Any]) -> None:
    print(f"{result['model']} ({result['dtype']}), through a real server, medians of {len(result['runs'])} turns:")
    for transport, figures in result["median"].items():
        print(f"  {transport:10s} " + "  ".join(f"{k} {v}" for k, v in figures.items()))
