"""`omnivox bench soak`: K scripted conversations at once, for minutes, against the realtime server.

Each of the K clients holds conversations one after another over the WebSocket protocol
(shared/PROTOCOL.md). A conversation is a seeded random script of 1-4 steps:

- ``ptt``: push-to-talk; the question as 24 kHz PCM16 at real-time pace, commit,
  ``response.create``, read to ``response.done``;
- ``server_vad``: the question then silence; the server's VAD ends the turn and answers;
- ``barge_in_vad`` / ``barge_in_command``: speech ("stop omni") while the answer plays, with
  ``omnivox.interrupt_mode`` "vad" (any speech cancels, and becomes the next turn, which is
  answered) or "command" (the ASR command detector decides);
- ``bad_frames``: invalid JSON, wrong types, an unknown event, bad base64, a binary frame,
  a cancel with nothing to cancel; each must get an ``error`` event, and the session must
  answer a ``session.update`` afterwards;

and a quarter of the conversations end with an abrupt disconnect mid-answer (the TCP
socket closed without a close frame; half with a FIN, half with a RST), the rest with a
normal close. Every wait is bounded (``turn_timeout_s``).

The server runs in-process on the given checkpoint, or is reached at ``url``. Its resident
memory is sampled every ~10 s (psutil when installed, else /proc; in-process that is this
process, the clients included; with ``url``, ``pid`` or the loopback process listening on its
port). At the end, after every client left, ``GET /metrics`` must show
``omnivox_active_sessions`` back at 0. The run fails (``ok`` false) on a stuck session, a
turn that did not finish in time, or a close the client did not ask for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import socket
import statistics
import struct
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from model.audio import load_audio_file
from model.errors import InputError

from .machine import machine_info

INPUT_RATE = 24000  # the protocol's default input format: audio/pcm, 24 kHz
CHUNK_MS = 40
STEPS = ("ptt", "server_vad", "barge_in_vad", "barge_in_command", "bad_frames")
STEP_WEIGHTS = (3, 3, 2, 1, 1)
MAX_STEPS = 4
DISCONNECT_SHARE = 0.25
BAD_FRAMES_PER_STEP = 3
QUIET_S = 1.5  # a conversation is idle after this long without an event and no response active
WARMUP_SHARE = 0.2
MAX_RECORDS = 20  # closes and mismatches kept in detail (all are counted)
QUIET_LOGGERS = ("omnivox.server", "faster_whisper")

# (frame, the error code it must get; None: any error code)
BAD_FRAMES: tuple[tuple[str | bytes, str | None], ...] = (
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    (json.dumps({"type": 42}), None),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 123}), "invalid_event"),
    (json.dumps({"type": "session.update", "session": {"output_modalities": "audio"}}), "invalid_event"),
    (json.dumps({"type": "session.update", "session": {"max_output_tokens": "many"}}), "invalid_event"),
    (json.dumps({"type": "omnivox.nope"}), "unknown_event"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "!!!"}), "invalid_audio"),
    (b"\x00\x01\x02", "invalid_event"),  # a binary frame while binary audio is off
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
)


class StepTimeout(Exception):
    """A bounded wait ran out."""


class Closed(Exception):
    """The connection closed under the step (the reader recorded why)."""


@dataclass
class Stats:
    connections: int = 0
    responses: Counter[str] = field(default_factory=Counter)  # response.done by status
    turns_by_step: Counter[str] = field(default_factory=Counter)
    barge_ins: Counter[str] = field(default_factory=Counter)  # "<mode>" attempted, "<mode>:<status>" outcome
    barge_in_ms: dict[str, list[float]] = field(default_factory=dict)  # mode -> speech starts -> response.done
    ttfa: list[tuple[float, float]] = field(default_factory=list)  # (t since start, ms) per answered turn
    answer_audio_s: list[float] = field(default_factory=list)
    disconnects: Counter[str] = field(default_factory=Counter)  # fin / rst
    bad_frames_sent: int = 0
    bad_frames_answered: int = 0
    bad_frame_mismatches: list[dict[str, Any]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # every error event, by code
    unprovoked_errors: Counter[str] = field(default_factory=Counter)  # outside the bad-frame steps
    unexpected_closes: int = 0
    close_records: list[dict[str, Any]] = field(default_factory=list)
    timeouts: Counter[str] = field(default_factory=Counter)  # "step:wait"
    client_exceptions: Counter[str] = field(default_factory=Counter)

    def unexpected_close(self, record: dict[str, Any]) -> None:
        self.unexpected_closes += 1
        if len(self.close_records) < MAX_RECORDS:
            self.close_records.append(record)


@dataclass
class Context:
    url: str
    headers: dict[str, str]
    deadline: float
    t0: float
    turn_timeout_s: float
    max_output_tokens: int
    question: bytes  # 24 kHz PCM16
    barge: bytes
    steps: tuple[str, ...] = STEPS  # the step kinds scripts are drawn from
    disconnect_share: float = DISCONNECT_SHARE
    stats: Stats = field(default_factory=Stats)


def pcm24k(audio16k: np.ndarray) -> bytes:
    """16 kHz float audio -> 24 kHz PCM16 bytes."""
    import soxr

    up = soxr.resample(audio16k.astype(np.float32), 16000, INPUT_RATE)
    return np.clip(np.round(up * 32768), -32768, 32767).astype("<i2").tobytes()


def silence(seconds: float) -> bytes:
    return bytes(2 * int(seconds * INPUT_RATE))


def audio_input(turn_detection: dict[str, Any] | None) -> dict[str, Any]:
    return {"input": {"format": {"type": "audio/pcm", "rate": INPUT_RATE}, "turn_detection": turn_detection}}


SERVER_VAD = {"type": "server_vad"}


class Conn:
    """One WebSocket connection: a reader task accounts for every event and queues it for the step."""

    def __init__(self, ws: Any, ctx: Context) -> None:
        self.ws, self.ctx, self.stats = ws, ctx, ctx.stats
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.step = "open"
        self.active: str | None = None  # the response in progress
        self.turn_t0: float | None = None  # when the user's turn ended (ptt: response.create)
        self.audio_bytes = 0
        self.provoking = False  # inside a bad-frame step: errors are expected
        self.by_us = False  # we closed (or aborted) the connection, or gave up on it
        self.aborted = False
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for msg in self.ws:
                if isinstance(msg, str):
                    ev = json.loads(msg)
                    self._account(ev)
                    self.queue.put_nowait(ev)
        except ConnectionClosed:
            pass
        except Exception as e:  # a server event this script cannot read: counted, and the connection given up
            self.stats.client_exceptions[f"{self.step}: reading: {type(e).__name__}: {e}"[:200]] += 1
            self.by_us = True
        finally:
            if not self.by_us:
                code, reason = self.ws.close_code, self.ws.close_reason
                self.stats.unexpected_close({"step": self.step, "code": code, "reason": reason or ""})
            self.queue.put_nowait(None)

    def _account(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "error":
            code = str((ev.get("error") or {}).get("code"))
            self.stats.errors[code] += 1
            if not self.provoking:
                self.stats.unprovoked_errors[code] += 1
        elif kind == "response.created":
            self.active = ev["response"]["id"]
            self.audio_bytes = 0
        elif kind == "response.output_audio.delta":
            if self.turn_t0 is not None:
                now = time.monotonic()
                self.stats.ttfa.append((round(now - self.ctx.t0, 1), round((now - self.turn_t0) * 1000, 1)))
                self.turn_t0 = None
            self.audio_bytes += len(ev.get("delta", "")) * 3 // 4
        elif kind == "response.done":
            status = ev["response"]["status"]
            self.stats.responses[status] += 1
            if status in ("completed", "incomplete"):
                self.stats.answer_audio_s.append(self.audio_bytes / 2 / 24000)
            self.active = None

    # ---- waits, all bounded ----
    async def expect(self, pred: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.ctx.turn_timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                ev = await asyncio.wait_for(self.queue.get(), left)
            except TimeoutError:
                raise StepTimeout(what) from None
            if ev is None:
                self.queue.put_nowait(None)
                raise Closed
            if pred(ev):
                return ev

    async def expect_type(self, *kinds: str) -> dict[str, Any]:
        return await self.expect(lambda e: e.get("type") in kinds, "|".join(kinds))

    async def settle(self) -> None:
        """Until no response is active and the server has been quiet for QUIET_S."""
        deadline = time.monotonic() + self.ctx.turn_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StepTimeout("settle")
            try:
                ev = await asyncio.wait_for(self.queue.get(), min(QUIET_S, left))
            except TimeoutError:
                if self.active is None:
                    return
                continue
            if ev is None:
                self.queue.put_nowait(None)
                raise Closed

    # ---- sends ----
    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def update(self, **session: Any) -> None:
        await self.send({"type": "session.update", "session": {"type": "realtime", **session}})
        ev = await self.expect_type("session.updated", "error")
        if ev["type"] == "error":
            raise RuntimeError(f"session.update refused: {ev['error']}")

    async def speak(self, pcm: bytes) -> None:
        """Append PCM16 at real-time pace, in CHUNK_MS chunks."""
        step = 2 * INPUT_RATE * CHUNK_MS // 1000
        t0 = time.monotonic()
        for i in range(0, len(pcm), step):
            await self.send(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()}
            )
            await asyncio.sleep(max(0.0, t0 + (i + step) / (2 * INPUT_RATE) - time.monotonic()))

    # ---- endings ----
    def abort(self, rst: bool) -> None:
        """Close the TCP socket without a close frame (RST when asked: SO_LINGER 0)."""
        self.by_us = self.aborted = True
        transport = self.ws.transport
        if rst:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def close(self) -> None:
        from websockets.protocol import State

        if self.ws.state is State.OPEN and not self.aborted:
            self.by_us = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 15)
        # else the server closed it first: the reader records that as unexpected (unless we gave up on it)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.reader, 15)
        if not self.reader.done():
            self.reader.cancel()


# ---- the steps of a conversation ----
async def step_ptt(conn: Conn, rng: random.Random) -> None:
    await conn.update(audio=audio_input(None))
    await conn.speak(conn.ctx.question)
    await conn.send({"type": "input_audio_buffer.commit"})
    await conn.expect_type("input_audio_buffer.committed")
    conn.turn_t0 = time.monotonic()
    await conn.send({"type": "response.create"})
    done = await conn.expect_type("response.done")
    if done["response"]["status"] in ("completed", "incomplete"):
        conn.stats.turns_by_step["ptt"] += 1


async def step_server_vad(conn: Conn, rng: random.Random) -> None:
    await conn.update(audio=audio_input(SERVER_VAD))
    await conn.speak(silence(0.3) + conn.ctx.question)
    conn.turn_t0 = time.monotonic()
    await conn.speak(silence(1.0))
    done = await conn.expect_type("response.done")
    if done["response"]["status"] in ("completed", "incomplete"):
        conn.stats.turns_by_step["server_vad"] += 1


async def _barge_in(conn: Conn, mode: str) -> None:
    await conn.update(audio=audio_input(SERVER_VAD), omnivox={"interrupt_mode": mode})
    await conn.speak(silence(0.3) + conn.ctx.question)
    conn.turn_t0 = time.monotonic()
    speaker = asyncio.create_task(conn.speak(silence(0.8)))
    try:
        first = await conn.expect_type("response.output_audio.delta", "response.done")
    finally:
        await speaker
    conn.stats.barge_ins[mode] += 1
    if first["type"] == "response.done":  # over before any audio: nothing to interrupt
        conn.stats.barge_ins[f"{mode}:no_audio"] += 1
        return
    rid = first["response_id"]
    t_speech = time.monotonic()
    speaker = asyncio.create_task(conn.speak(conn.ctx.barge + silence(0.7)))
    try:
        done = await conn.expect(
            lambda e: e.get("type") == "response.done" and e["response"]["id"] == rid, "response.done"
        )
        status = done["response"]["status"]
        conn.stats.barge_ins[f"{mode}:{status}"] += 1
        if status == "cancelled":
            conn.stats.barge_in_ms.setdefault(mode, []).append(round((time.monotonic() - t_speech) * 1000, 1))
        else:
            conn.stats.turns_by_step[f"barge_in_{mode}"] += 1
    finally:
        await speaker  # the whole utterance and its trailing silence: the server's VAD sees its end
    conn.turn_t0 = t_speech + len(conn.ctx.barge) / (2 * INPUT_RATE)  # the end of the interrupting speech
    if mode == "vad":  # as OpenAI's server_vad: the interrupting speech is the next turn, and is answered
        follow = await conn.expect_type("response.done")
        if follow["response"]["status"] in ("completed", "incomplete"):
            conn.stats.turns_by_step["barge_in_vad_followup"] += 1


async def step_barge_in_vad(conn: Conn, rng: random.Random) -> None:
    await _barge_in(conn, "vad")


async def step_barge_in_command(conn: Conn, rng: random.Random) -> None:
    await _barge_in(conn, "command")


async def step_bad_frames(conn: Conn, rng: random.Random) -> None:
    conn.provoking = True
    try:
        for frame, want in rng.sample(BAD_FRAMES, BAD_FRAMES_PER_STEP):
            await conn.ws.send(frame)
            conn.stats.bad_frames_sent += 1
            ev = await conn.expect_type("error")
            conn.stats.bad_frames_answered += 1
            code = ev["error"].get("code")
            if want is not None and code != want and len(conn.stats.bad_frame_mismatches) < MAX_RECORDS:
                shown = frame if isinstance(frame, str) else f"<binary {len(frame)} bytes>"
                conn.stats.bad_frame_mismatches.append({"frame": shown[:80], "want": want, "got": code})
    finally:
        conn.provoking = False
    await conn.update(instructions="still alive?")  # the session lives on


STEP_FUNCS = {
    "ptt": step_ptt,
    "server_vad": step_server_vad,
    "barge_in_vad": step_barge_in_vad,
    "barge_in_command": step_barge_in_command,
    "bad_frames": step_bad_frames,
}


async def disconnect_mid_answer(conn: Conn, rng: random.Random) -> None:
    await conn.update(audio=audio_input(None))
    await conn.speak(conn.ctx.question)
    await conn.send({"type": "input_audio_buffer.commit"})
    await conn.send({"type": "response.create"})
    await conn.expect_type("response.output_audio.delta", "response.done")
    rst = rng.random() < 0.5
    conn.abort(rst)
    conn.stats.disconnects["rst" if rst else "fin"] += 1


async def conversation(ctx: Context, rng: random.Random) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    weights = [STEP_WEIGHTS[STEPS.index(name)] for name in ctx.steps]
    plan = rng.choices(ctx.steps, weights, k=rng.randint(1, MAX_STEPS))
    abrupt = rng.random() < ctx.disconnect_share
    try:
        ws = await asyncio.wait_for(
            connect(ctx.url, max_size=None, open_timeout=30, proxy=None, additional_headers=ctx.headers), 40
        )
    except Exception as e:  # refused (503, 401), reset, timed out: the server did not take the session
        ctx.stats.unexpected_close({"step": "connect", "error": f"{type(e).__name__}: {e}"[:200]})
        await asyncio.sleep(1.0)
        return
    ctx.stats.connections += 1
    conn = Conn(ws, ctx)
    try:
        await conn.expect_type("session.created")
        await conn.update(max_output_tokens=ctx.max_output_tokens)
        for step in plan:
            if time.monotonic() >= ctx.deadline:
                break
            conn.step = step
            await STEP_FUNCS[step](conn, rng)
            await conn.settle()
        if abrupt and time.monotonic() < ctx.deadline:
            conn.step = "disconnect"
            await disconnect_mid_answer(conn, rng)
    except StepTimeout as e:
        ctx.stats.timeouts[f"{conn.step}:{e}"] += 1
    except (Closed, ConnectionClosed):
        pass  # the reader recorded the close
    except RuntimeError as e:  # a session.update refused
        ctx.stats.unexpected_close({"step": conn.step, "error": str(e)[:200]})
    except Exception as e:  # a bug of this script, or a server event it cannot read: counted, never fatal
        ctx.stats.client_exceptions[f"{conn.step}: {type(e).__name__}: {e}"[:200]] += 1
    finally:
        await conn.close()


async def client_loop(ctx: Context, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < ctx.deadline:
        await conversation(ctx, rng)


# ---- the server's memory and session gauge ----
def rss_reader(pid: int | None) -> tuple[Callable[[], float | None], str]:
    """A function giving the RSS in MB of pid (None: this process), and its source."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return (lambda: proc.memory_info().rss / 2**20), "psutil"
    except ImportError:
        pass
    path = Path(f"/proc/{pid if pid is not None else 'self'}/status")

    def from_proc() -> float | None:
        try:
            for line in path.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    return from_proc, str(path)


def listening_pid(port: int) -> int | None:
    """The local process listening on this TCP port (psutil; None when unknown or not allowed)."""
    try:
        import psutil

        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return int(c.pid)
    except Exception:
        return None
    return None


def metrics_url(ws_url: str) -> str:
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return f"{scheme}://{parts.netloc}/metrics"


def active_sessions(url: str, headers: dict[str, str]) -> float | None:
    try:
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return None
    for line in text.splitlines():
        if line.startswith("omnivox_active_sessions "):
            return float(line.split()[1])
    return None


async def sampler(ctx: Context, stop: asyncio.Event, interval_s: float, rss: Callable[[], float | None],
                  murl: str, series: list[dict[str, Any]]) -> None:  # fmt: skip
    while True:
        active = await asyncio.to_thread(active_sessions, murl, ctx.headers)
        mb = rss()
        t = time.monotonic() - ctx.t0
        series.append({"t_s": round(t, 1), "rss_mb": None if mb is None else round(mb, 1), "active_sessions": active})
        s = ctx.stats
        print(
            f"[soak {t:6.0f} s] rss {'-' if mb is None else f'{mb:.1f}'} MB, active {active}, "
            f"turns {s.responses['completed'] + s.responses['incomplete']}, barge-ins {_barge_total(s)}, "
            f"disconnects {sum(s.disconnects.values())}, errors {sum(s.errors.values())}, "
            f"unexpected closes {s.unexpected_closes}, timeouts {sum(s.timeouts.values())}",
            flush=True,
        )
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            continue
        if time.monotonic() - ctx.t0 - t < 1.0:
            return  # the clients left right after this sample: it is the last one


def _barge_total(s: Stats) -> int:
    return sum(n for k, n in s.barge_ins.items() if ":" not in k)


async def _run(ctx: Context, sessions: int, seed: int, interval_s: float, rss: Callable[[], float | None],
               series: list[dict[str, Any]]) -> float | None:  # fmt: skip
    stop = asyncio.Event()
    murl = metrics_url(ctx.url)
    sample_task = asyncio.create_task(sampler(ctx, stop, interval_s, rss, murl, series))
    await asyncio.gather(*(client_loop(ctx, seed * 1000 + k) for k in range(sessions)))
    stop.set()
    await sample_task
    # Every client has left: the server's session gauge must come back to 0.
    deadline = time.monotonic() + 15
    active = await asyncio.to_thread(active_sessions, murl, ctx.headers)
    while (active is None or active > 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        active = await asyncio.to_thread(active_sessions, murl, ctx.headers)
    return active


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 1)


def rss_growth(series: list[dict[str, Any]], duration_s: float, window_s: float = 60.0) -> dict[str, Any]:
    """RSS growth after the warm-up (first 20% of the run): the median of the samples in the
    window that follows the warm-up against the median of the run's last window. Single
    samples swing by tens of MB with the audio in flight at that instant; medians do not."""
    run = [s for s in series if s["rss_mb"] is not None]
    start = WARMUP_SHARE * duration_s
    after_warmup = [s for s in run if s["t_s"] >= start]
    if len(after_warmup) < 2:
        return {"warmup_mb": None, "final_mb": None, "growth_pct": None, "peak_mb": None}
    end = after_warmup[-1]["t_s"]
    window = min(window_s, (end - start) / 2)
    base = statistics.median(s["rss_mb"] for s in after_warmup if s["t_s"] <= start + window)
    final = statistics.median(s["rss_mb"] for s in after_warmup if s["t_s"] >= end - window)
    return {
        "warmup_mb": round(base, 1),
        "final_mb": round(final, 1),
        "growth_pct": round((final - base) / base * 100, 2),
        "window_s": round(window, 1),
        "first_sample_mb": after_warmup[0]["rss_mb"],
        "last_sample_mb": after_warmup[-1]["rss_mb"],
        "peak_mb": max(s["rss_mb"] for s in run),
    }


def bench_soak(
    checkpoint: str | Path | None,
    question_wav: Path,
    barge_wav: Path,
    *,
    minutes: float,
    sessions: int = 4,
    url: str | None = None,
    api_key: str | None = None,
    pid: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    max_output_tokens: int = 150,
    turn_timeout_s: float = 60.0,
    seed: int = 0,
    steps: tuple[str, ...] = STEPS,
    disconnect_share: float = DISCONNECT_SHARE,
    sample_every_s: float = 10.0,
) -> dict[str, Any]:
    if minutes <= 0 or sessions < 1:
        raise InputError("minutes must be > 0 and sessions >= 1")
    if not steps or set(steps) - set(STEPS):
        raise InputError(f"steps must be among {', '.join(STEPS)}")
    if not 0 <= disconnect_share <= 1:
        raise InputError("disconnect_share must be within [0, 1]")
    duration_s = minutes * 60
    server = engine = thread = None
    rss_source = None
    if url is None:
        from server.serve import build_engine, start_in_thread
        from server.settings import ServerSettings

        if checkpoint is None:
            raise InputError("a checkpoint is needed to start the server in-process")
        spec: dict[str, Any] = (
            {"checkpoint_dir": Path(checkpoint)} if Path(checkpoint).is_dir() else {"checkpoint": str(checkpoint)}
        )
        settings = ServerSettings(port=0, **spec, dtype=dtype, device=device, max_sessions=2 * sessions + 2,
                                  max_new_tokens=max_output_tokens, log_level="warning")  # fmt: skip
        engine = build_engine(settings)
        server, thread, port = start_in_thread(engine)
        url = f"ws://127.0.0.1:{port}/v1/realtime"
        rss, rss_source = rss_reader(None)
        rss_source += " (this process: server and clients)"
    else:
        port = urlsplit(url).port or (443 if url.startswith("wss") else 80)
        pid = pid if pid is not None else listening_pid(port)
        if pid is not None:
            rss, rss_source = rss_reader(pid)
            rss_source += f" (pid {pid})"
        else:
            rss, rss_source = (lambda: None), "none (pass --pid)"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    question = pcm24k(load_audio_file(question_wav))
    barge = pcm24k(load_audio_file(barge_wav))
    t0 = time.monotonic()
    ctx = Context(url, headers, t0 + duration_s, t0, turn_timeout_s, max_output_tokens, question, barge,
                  tuple(steps), disconnect_share)  # fmt: skip
    interval = min(sample_every_s, max(1.0, duration_s / 10))
    series: list[dict[str, Any]] = []
    # In-process, per-session INFO lines (opened/closed, each ASR call) would bury the progress lines.
    quiet = [logging.getLogger(name) for name in QUIET_LOGGERS] if server is not None else []
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        active_at_end = asyncio.run(_run(ctx, sessions, seed, interval, rss, series))
        end_mb = rss()
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
        if server is not None and engine is not None and thread is not None:
            server.should_exit = True
            thread.join(15)
            engine.close()
    wall_s = time.monotonic() - t0
    s = ctx.stats
    stuck = None if active_at_end is None else int(active_at_end)
    failures = []
    if stuck is None:
        failures.append("the server's /metrics gave no omnivox_active_sessions at the end")
    elif stuck:
        failures.append(f"{stuck} session(s) still active on the server after every client left")
    if s.unexpected_closes:
        failures.append(f"{s.unexpected_closes} connection(s) closed or refused without the client asking")
    if s.client_exceptions:
        failures.append(f"{sum(s.client_exceptions.values())} client step(s) failed: {dict(s.client_exceptions)}")
    if s.timeouts:
        failures.append(f"{sum(s.timeouts.values())} wait(s) ran past {turn_timeout_s:g} s: {dict(s.timeouts)}")
    ttfa_ms = [ms for _, ms in s.ttfa]
    warm = [ms for t, ms in s.ttfa if t < WARMUP_SHARE * duration_s]
    last = [ms for t, ms in s.ttfa if t >= (1 - WARMUP_SHARE) * duration_s]
    return {
        "benchmark": "soak",
        "url": url,
        "in_process": server is not None,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "dtype": dtype if server is not None else None,
        "minutes": minutes,
        "sessions": sessions,
        "seed": seed,
        "steps": list(steps),
        "disconnect_share": disconnect_share,
        "wall_s": round(wall_s, 1),
        "max_output_tokens": max_output_tokens,
        "turn_timeout_s": turn_timeout_s,
        "connections": s.connections,
        "turns_completed": s.responses["completed"] + s.responses["incomplete"],
        "turns_by_step": dict(s.turns_by_step),
        "responses_by_status": dict(s.responses),
        "answer_audio_s_mean": round(statistics.mean(s.answer_audio_s), 2) if s.answer_audio_s else None,
        "ttfa_ms": {
            "p50": _pct(ttfa_ms, 0.5),
            "p95": _pct(ttfa_ms, 0.95),
            "warmup_p50": _pct(warm, 0.5),
            "last_20pct_p50": _pct(last, 0.5),
        },
        "barge_ins": _barge_total(s),
        "barge_ins_by_mode": {
            mode: {"attempted": s.barge_ins[mode]}
            | {k.split(":", 1)[1]: n for k, n in s.barge_ins.items() if k.startswith(mode + ":")}
            | {"cancel_ms_p50": _pct(s.barge_in_ms.get(mode, []), 0.5)}
            for mode in ("vad", "command")
        },
        "disconnects": sum(s.disconnects.values()),
        "disconnects_by_kind": dict(s.disconnects),
        "bad_frames": {
            "sent": s.bad_frames_sent,
            "answered": s.bad_frames_answered,
            "mismatched": s.bad_frame_mismatches,
        },
        "errors_by_code": dict(s.errors),
        "unprovoked_errors_by_code": dict(s.unprovoked_errors),
        "unexpected_closes": s.unexpected_closes,
        "unexpected_close_records": s.close_records,
        "timeouts": dict(s.timeouts),
        "client_exceptions": dict(s.client_exceptions),
        "stuck_sessions": stuck,
        "rss_source": rss_source,
        "rss_interval_s": interval,
        "rss_series": series,
        "rss_after_clients_left_mb": None if end_mb is None else round(end_mb, 1),
        "rss": rss_growth(series, duration_s),
        "ok": not failures,
        "failures": failures,
        "machine": machine_info(device),
    }


def print_soak(r: dict[str, Any]) -> None:
    rss, ttfa, bad = r["rss"], r["ttfa_ms"], r["bad_frames"]
    where = "in-process" if r["in_process"] else r["url"]
    lines = [
        f"soak: {r['minutes']:g} min, {r['sessions']} sessions, {r['connections']} connections ({where})",
        f"  turns completed {r['turns_completed']} {r['turns_by_step']}; responses {r['responses_by_status']}",
        f"  ttfa p50 {ttfa['p50']} ms, p95 {ttfa['p95']} ms "
        f"(warm-up p50 {ttfa['warmup_p50']}, last 20% p50 {ttfa['last_20pct_p50']})",
        f"  barge-ins {r['barge_ins']} {r['barge_ins_by_mode']}",
        f"  disconnects {r['disconnects']} {r['disconnects_by_kind']}",
        f"  bad frames {bad['sent']} sent, {bad['answered']} answered, {len(bad['mismatched'])} with another code",
        f"  errors by code {r['errors_by_code']} (unprovoked {r['unprovoked_errors_by_code']})",
        f"  unexpected closes {r['unexpected_closes']}, timeouts {r['timeouts']}, stuck sessions {r['stuck_sessions']}",
        f"  rss ({r['rss_source']}): median after warm-up {rss['warmup_mb']} MB, median at the end "
        f"{rss['final_mb']} MB, "
        f"growth {rss['growth_pct']}%, peak {rss['peak_mb']} MB",
        "  OK" if r["ok"] else "  FAILED: " + "; ".join(r["failures"]),
    ]
    print("\n".join(lines))
