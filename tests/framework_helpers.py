"""Shared pieces of tests/test_frameworks.py: a wire tap, a real-time microphone, error-log capture.

The frameworks under test talk to the real server through `Tap`, a transparent WebSocket proxy
that records every event in both directions (audio payloads replaced by their byte count), so a
test can wait on what the server said and a failure can show the exact conversation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from .conftest import fixture_audio
from .openai_events import check_server_event

Event = dict[str, Any]


# -- the wire tap ---------------------------------------------------------------------------------


@dataclass
class Wire:
    direction: str  # "client" (framework -> server) or "server"
    event: Event
    t: float  # loop time it passed the tap


class Tap:
    """A recording WebSocket proxy in front of the server (one framework connection at a time)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.wire: list[Wire] = []
        self.connections = 0
        self.invalid: list[str] = []  # server events that are not valid OpenAI events
        self._cond: asyncio.Condition | None = None
        self._server: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    # addresses in the forms the frameworks take
    @property
    def realtime_url(self) -> str:  # full URL with the model query (openai-agents)
        return f"ws://127.0.0.1:{self.port}/v1/realtime?model=gpt-realtime"

    @property
    def realtime_base(self) -> str:  # pipecat appends ?model=...
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def http_v1(self) -> str:  # LiveKit turns http(s) into ws(s) and appends /realtime?model=...
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ws_v1(self) -> str:  # openai SDK websocket_base_url
        return f"ws://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> Tap:
        self._cond = asyncio.Condition()
        self._server = await serve(self._handle, "127.0.0.1", 0, max_size=None)
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _record(self, direction: str, message: str | bytes) -> None:
        if isinstance(message, bytes):
            ev: Event = {"type": "<binary frame>", "_bytes": len(message)}
        else:
            try:
                ev = json.loads(message)
            except ValueError:
                ev = {"type": "<not json>", "raw": message[:200]}
            if direction == "server":  # checked whole, before the audio payload is dropped below
                try:
                    check_server_event(ev, extensions=False)
                except AssertionError as e:
                    self.invalid.append(str(e)[:2000])
            for key in ("delta", "audio"):  # audio payloads: keep the byte count only
                if isinstance(ev.get(key), str) and ev.get("type", "").endswith(("audio.delta", "buffer.append")):
                    ev["_bytes"] = len(base64.b64decode(ev.pop(key)))
        assert self._cond is not None
        async with self._cond:
            self.wire.append(Wire(direction, ev, asyncio.get_running_loop().time()))
            self._cond.notify_all()

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        assert ws.request is not None
        headers = [(k, v) for k, v in ws.request.headers.raw_items() if k.lower() == "authorization"]
        url = f"ws://127.0.0.1:{self.upstream_port}{ws.request.path}"
        async with connect(url, additional_headers=headers, max_size=None, open_timeout=10) as up:

            async def c2s() -> None:
                async for m in ws:
                    await self._record("client", m)
                    await up.send(m)

            async def s2c() -> None:
                async for m in up:
                    await self._record("server", m)
                    await ws.send(m)

            tasks = [asyncio.create_task(c2s()), asyncio.create_task(s2c())]
            self._tasks.update(tasks)
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                    self._tasks.discard(t)
                await up.close()
                await ws.close()

    # -- reading the wire

    def server_events(self, since: int = 0) -> list[Event]:
        return [w.event for w in self.wire[since:] if w.direction == "server"]

    def client_events(self, since: int = 0) -> list[Event]:
        return [w.event for w in self.wire[since:] if w.direction == "client"]

    def mark(self) -> int:
        return len(self.wire)

    async def wait_for(
        self, pred: Callable[[Event], bool], *, what: str, timeout: float, since: int = 0, direction: str = "server"
    ) -> Wire:
        """The first `direction` event from wire index `since` on that satisfies `pred`."""
        assert self._cond is not None
        i = since

        def find() -> Wire | None:
            nonlocal i
            while i < len(self.wire):
                w = self.wire[i]
                i += 1
                if w.direction == direction and pred(w.event):
                    return w
            return None

        async def waiter() -> Wire:
            assert self._cond is not None
            async with self._cond:
                while (found := find()) is None:
                    await self._cond.wait()
                return found

        try:
            return await asyncio.wait_for(waiter(), timeout)
        except TimeoutError:
            errors = f"; the server sent errors: {self.errors()}" if self.errors() else ""
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}{errors}\n{self.summary()}"
            ) from None

    def errors(self) -> list[Event]:
        return [e for e in self.server_events() if e.get("type") == "error"]

    def response_done(self, response_id: str) -> Event | None:
        for e in self.server_events():
            if e.get("type") == "response.done" and e["response"].get("id") == response_id:
                return e
        return None

    def audio_bytes(self, response_id: str) -> int:
        return sum(
            e.get("_bytes", 0)
            for e in self.server_events()
            if e.get("type") == "response.output_audio.delta" and e.get("response_id") == response_id
        )

    def transcript(self, response_id: str) -> str:
        return "".join(
            e.get("delta", "")
            for e in self.server_events()
            if e.get("type") == "response.output_audio_transcript.delta" and e.get("response_id") == response_id
        )

    def summary(self, limit: int = 160) -> str:
        """The conversation as the tap saw it: one line per event, runs of deltas/appends folded."""
        lines: list[str] = []
        last = ""
        count = 0
        for w in self.wire:
            ev = w.event
            name = ev.get("type", "?")
            if name.endswith((".delta", ".append")):
                key = f"{w.direction} {name}"
                if key == last:
                    count += 1
                    continue
                if count:
                    lines[-1] += f" x{count + 1}"
                last, count = key, 0
                lines.append(f"{'>>' if w.direction == 'client' else '<<'} {name}")
                continue
            if count:
                lines[-1] += f" x{count + 1}"
            last, count = "", 0
            lines.append(f"{'>>' if w.direction == 'client' else '<<'} {_describe(ev)}")
        if count:
            lines[-1] += f" x{count + 1}"
        if len(lines) > limit:
            lines = [*lines[: limit // 2], f"... {len(lines) - limit} more ...", *lines[-limit // 2 :]]
        return "wire (>> framework to server, << server to framework):\n  " + "\n  ".join(lines)


def _describe(ev: Event) -> str:
    name = ev.get("type", "?")
    if name == "error":
        return f"error {json.dumps(ev.get('error'))}"
    if name == "response.done":
        r = ev.get("response", {})
        return f"response.done id={r.get('id')} status={r.get('status')} details={r.get('status_details')}"
    if name in ("response.created",):
        r = ev.get("response", {})
        return f"{name} id={r.get('id')} metadata={r.get('metadata')}"
    if name in ("session.update", "response.create", "conversation.item.create", "conversation.item.truncate",
                "conversation.item.retrieve", "conversation.item.delete", "response.cancel"):  # fmt: skip
        body = {k: v for k, v in ev.items() if k != "type"}
        text = json.dumps(body)
        return f"{name} {text[:600]}"
    if name in ("conversation.item.added", "conversation.item.done", "conversation.item.retrieved"):
        item = ev.get("item") or {}
        return f"{name} item={item.get('id')} role={item.get('role')} previous_item_id={ev.get('previous_item_id')}"
    extra = {k: ev[k] for k in ("item_id", "response_id", "event_id", "audio_start_ms", "audio_end_ms") if k in ev}
    return f"{name} {extra}" if extra else name


# -- a microphone -----------------------------------------------------------------------------------


def pcm16(audio16k: np.ndarray, rate: int) -> bytes:
    """16 kHz float audio as PCM16 little-endian mono at `rate`."""
    audio = audio16k if rate == 16000 else soxr.resample(audio16k, 16000, rate)
    return np.clip(np.round(np.asarray(audio) * 32768), -32768, 32767).astype("<i2").tobytes()


class Mic:
    """Streams PCM16 mono at `rate` in 100 ms chunks at real-time pace, silence between clips.

    `send` gets each chunk as bytes. `await mic.say(clip)` queues a 16 kHz float clip and returns
    once its last chunk was sent.
    """

    CHUNK_S = 0.1

    def __init__(self, send: Callable[[bytes], Awaitable[None]], rate: int) -> None:
        self.send, self.rate = send, rate
        self.chunk = int(rate * self.CHUNK_S)
        self._queue: list[tuple[bytes, asyncio.Event]] = []
        self._task: asyncio.Task[None] | None = None
        self.sent_s = 0.0

    async def say(self, audio16k: np.ndarray) -> None:
        done = asyncio.Event()
        self._queue.append((pcm16(audio16k, self.rate), done))
        await done.wait()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        silence = bytes(2 * self.chunk)
        current = b""
        done: asyncio.Event | None = None
        pos = 0
        while True:
            if done is None and self._queue:
                current, done = self._queue.pop(0)
                pos = 0
            if done is not None:
                data = current[pos : pos + 2 * self.chunk]
                pos += len(data)
                if pos >= len(current):
                    data += silence[: 2 * self.chunk - len(data)]
            else:
                data = silence
            await self.send(data)
            if done is not None and pos >= len(current):
                done.set()
                done = None
            n += 1
            self.sent_s = n * self.CHUNK_S
            await asyncio.sleep(max(0.0, start + n * self.CHUNK_S - loop.time()))

    async def __aenter__(self) -> Mic:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    def check(self) -> None:
        """Raise what the microphone task died of (a framework refusing audio), if it died."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                raise AssertionError(f"sending audio failed: {exc!r}") from exc


# -- the shared script: a completed answer, then a barge-in ---------------------------------------


@dataclass
class BargeIn:
    first: str  # response ids
    second: str
    second_first_audio_t: float  # loop time the second response's first audio passed the tap


async def spoken_turn_then_barge_in(tap: Tap, mic: Mic) -> BargeIn:
    """Ask the question and let the answer finish and play out; ask again and say "stop omni" once
    the second answer is audible. Returns the two response ids (asserts only that events came)."""
    question, stop = fixture_audio("question"), fixture_audio("stop_omni")
    loop = asyncio.get_running_loop()
    await tap.wait_for(lambda e: e["type"] == "session.updated", what="session.updated", timeout=20)
    await mic.say(np.concatenate([np.zeros(4800, np.float32), question]))
    created = await tap.wait_for(lambda e: e["type"] == "response.created", what="the first response.created",
                                 timeout=30)  # fmt: skip
    first = created.event["response"]["id"]
    await tap.wait_for(
        lambda e: e["type"] == "response.done" and e["response"]["id"] == first,
        what="the first response.done",
        timeout=40,
    )
    # let the answer play out (the server keeps a command watcher armed until it has)
    deltas = [
        w for w in tap.wire
        if w.direction == "server" and w.event["type"] == "response.output_audio.delta"
        and w.event.get("response_id") == first
    ]  # fmt: skip
    if deltas:
        end = deltas[0].t + tap.audio_bytes(first) / 2 / 24000
        await asyncio.sleep(max(0.0, end - loop.time()) + 0.6)
    since = tap.mark()
    await mic.say(question)
    audio = await tap.wait_for(lambda e: e["type"] == "response.output_audio.delta",
                               what="audio of the second response", timeout=40, since=since)  # fmt: skip
    second = audio.event["response_id"]
    await mic.say(stop)
    await tap.wait_for(
        lambda e: e["type"] == "response.done" and e["response"]["id"] == second,
        what="the second (barged-in) response.done",
        timeout=25,
        since=since,
    )
    await asyncio.sleep(1.0)  # trailing events (truncate, retrieve, their answers, errors) arrive
    return BargeIn(first, second, audio.t)


def assert_no_errors(tap: Tap) -> None:
    """No error event, and (the frameworks asked for no extensions) every server event a valid
    OpenAI event, required fields included."""
    errors = tap.errors()
    assert not errors, f"the server sent error events: {errors}\n{tap.summary()}"
    assert not tap.invalid, f"the server sent invalid events: {tap.invalid[:3]}\n{tap.summary()}"


def assert_wire_ok(tap: Tap, run: BargeIn) -> None:
    """The server's side of the issue's assertions, with the whole wire in every message."""
    assert_no_errors(tap)
    done1 = tap.response_done(run.first)
    assert done1 is not None and done1["response"]["status"] == "completed", (
        f"first response not completed: {done1 and done1['response'].get('status')}\n{tap.summary()}"
    )
    assert tap.audio_bytes(run.first) > 0, f"first response has no audio\n{tap.summary()}"
    assert tap.transcript(run.first).strip(), f"first response has no transcript\n{tap.summary()}"
    done2 = tap.response_done(run.second)
    assert done2 is not None, tap.summary()
    if done2["response"]["status"] == "completed":
        # The answer had made all its audio before "stop omni" was heard (a short answer on a
        # slow host): nothing to cancel, as with OpenAI; the barge-in must still be heard after it.
        server = tap.server_events()
        after = server[next(i for i, e in enumerate(server) if e is done2) :]
        assert any(e["type"] == "input_audio_buffer.speech_started" for e in after), (
            f"barge-in not heard after a completed answer\n{tap.summary()}"
        )
        return
    assert done2["response"]["status"] == "cancelled", f"barge-in did not cancel: {done2['response']}\n{tap.summary()}"
    assert (done2["response"].get("status_details") or {}).get("reason") == "turn_detected", tap.summary()


def brief(errors: list[Any]) -> list[str]:
    """Framework error objects, each as one short line (pydantic errors are pages long)."""
    out = []
    for e in errors:
        details = getattr(e, "errors", None)
        if callable(details):  # pydantic ValidationError: the first problem and the event type it was in
            first = details()[0]
            event = first.get("input")
            kind = event.get("type") if isinstance(event, dict) else None
            out.append(f"{type(e).__name__}: {str(first.get('msg'))[:120]} (event type {kind!r})")
        else:
            out.append(f"{type(e).__name__}: {str(e).splitlines()[0][:400]}")
    return out


# -- error logs ---------------------------------------------------------------------------------------


class ErrorLogs(logging.Handler):
    """Collects ERROR (and worse) records of the named stdlib loggers while active."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.ERROR)
        self.names = names
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f" [{record.exc_info[1]!r}]"
        self.records.append(text[:2000])

    @contextlib.contextmanager
    def active(self) -> Iterator[ErrorLogs]:
        loggers = [logging.getLogger(n) for n in self.names]
        for lg in loggers:
            lg.addHandler(self)
        try:
            yield self
        finally:
            for lg in loggers:
                lg.removeHandler(self)


@contextlib.contextmanager
def loguru_errors() -> Iterator[list[str]]:
    """Collects loguru ERROR records (pipecat logs with loguru)."""
    from loguru import logger

    records: list[str] = []
    hid = logger.add(lambda m: records.append(str(m)[:2000]), level="ERROR", format="{name}: {message}")
    try:
        yield records
    finally:
        logger.remove(hid)
