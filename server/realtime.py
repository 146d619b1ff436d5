"""The `/v1/realtime` WebSocket: one `Connection` per client, mapping the wire protocol
(shared/PROTOCOL.md) onto a `streaming.Session` and the session's typed events back.

The event loop only moves bytes: session calls that compute (VAD, resampling) run in a
worker thread, one at a time per connection; the model runs on the runner's thread.
Outgoing events go through a bounded queue: a client that stops reading is cut off
when it fills, without slowing anyone else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from model.vision import NO_IMAGES, ImageError, image_pixels
from streaming.config import InterruptMode, SessionConfig, TurnDetection
from streaming.events import (
    AudioChunk,
    Event,
    InputCleared,
    InputCommitted,
    InputTranscript,
    Interrupted,
    ResponseCreated,
    ResponseDone,
    SessionError,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
)
from streaming.session import Session

from .protocol import (
    AudioAppend,
    AudioClear,
    AudioCommit,
    ClientEvent,
    ItemCreate,
    ItemTruncate,
    Playback,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    SessionUpdate,
    decode_audio,
    decode_image_url,
    error_event,
    parse_client_event,
)

log = logging.getLogger("omnivox.server")

OUTPUT_RATE = 24000


@dataclass
class _ResponseState:
    response_id: str
    item_id: str
    audio: bool
    task: str = ""
    transcript: str = ""
    audio_ms: float = 0.0


class Connection:
    def __init__(
        self,
        ws: WebSocket,
        session: Session,
        session_id: str,
        model_name: str,
        demo: bool,
        send_buffer: int,
        on_event: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.ws = ws
        self.session = session
        self.session_id = session_id
        self.model_name = model_name
        self.demo = demo
        self.binary_audio = False
        self.instructions = ""
        self._out: asyncio.Queue[str | bytes | None] = asyncio.Queue(maxsize=send_buffer)
        self._ids = itertools.count(1)
        self._responses: dict[str, _ResponseState] = {}
        self._last_item: str | None = None
        self._assistant_items: dict[str, _ResponseState] = {}
        self._on_event = on_event or (lambda kind, value: None)
        self._closing = False
        self._wake = asyncio.Event()
        self._close_task: asyncio.Task[None] | None = None

    # ---------------- lifecycle ----------------

    async def run(self) -> None:
        self._send({"type": "session.created", "session": self.session_view()})
        sender = asyncio.create_task(self._sender())
        pump = asyncio.create_task(self._pump())
        try:
            await self._receiver()
        finally:
            self._closing = True
            pump.cancel()
            await asyncio.to_thread(self.session.close)
            with contextlib.suppress(asyncio.QueueFull):
                self._out.put_nowait(None)
            sender.cancel()
            for task in (pump, sender):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, reason=reason)

    async def _receiver(self) -> None:
        while not self._closing:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await self._on_binary(message["bytes"])
            elif message.get("text") is not None:
                await self._on_text(message["text"])

    async def _sender(self) -> None:
        while True:
            item = await self._out.get()
            if item is None:
                return
            try:
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_text(item)
            except Exception:
                return

    async def _pump(self) -> None:
        """Move session events to the client as they come."""
        while not self._closing:
            for event in self.session.poll():
                self._map_event(event)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.01)

    # ---------------- output ----------------

    def _new_event_id(self) -> str:
        return f"event_{self.session_id[-8:]}_{next(self._ids):07d}"

    def _send(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", self._new_event_id())
        self._enqueue(json.dumps(event, separators=(",", ":")))
        if event["type"] == "error":
            self._on_event("error", event["error"]["code"])

    def _enqueue(self, data: str | bytes) -> None:
        if self._closing:
            return
        try:
            self._out.put_nowait(data)
        except asyncio.QueueFull:
            log.warning("session %s: client is not reading; disconnecting", self.session_id)
            self._closing = True
            self._close_task = asyncio.get_running_loop().create_task(self._hard_close())

    async def _hard_close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code=1008, reason="send buffer full: the client is not reading")

    def _error(self, code: str, message: str, param: str | None = None, event_id: str | None = None) -> None:
        self._send(error_event(ProtocolError(code, message, param, event_id), self._new_event_id()))

    def session_view(self) -> dict[str, Any]:
        cfg = self.session.config
        td = cfg.turn_detection
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.session_id,
            "model": self.model_name,
            "output_modalities": list(cfg.output_modalities),
            "instructions": self.instructions,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": cfg.input_sample_rate},
                    "turn_detection": None
                    if td is None
                    else {
                        "type": "server_vad",
                        "threshold": td.threshold,
                        "prefix_padding_ms": td.prefix_padding_ms,
                        "silence_duration_ms": td.silence_duration_ms,
                        "create_response": td.create_response,
                        "interrupt_response": td.interrupt_response,
                    },
                    "transcription": {"model": "faster-whisper-tiny.en"} if cfg.transcribe_input else None,
                },
                "output": {"format": {"type": "audio/pcm", "rate": OUTPUT_RATE}, "voice": "omni"},
            },
            "omnivox": {
                "interrupt_mode": cfg.interrupt_mode.value,
                "interrupt_phrases": list(cfg.interrupt_phrases),
                "binary_audio": self.binary_audio,
                "max_audio_lead_ms": cfg.max_audio_lead_ms,
                "demo_checkpoint": self.demo,
                "model_family": self.session.runner.model.family,
                "images": self.session.runner.model.takes_images,  # input_image accepted (Mini-Omni2)
            },
        }

    def _map_event(self, event: Event) -> None:
        if isinstance(event, SpeechStarted):
            self._send({"type": "input_audio_buffer.speech_started", "audio_start_ms": event.audio_start_ms,
                        "item_id": event.item_id})  # fmt: skip
        elif isinstance(event, SpeechStopped):
            self._send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": event.audio_end_ms,
                        "item_id": event.item_id})  # fmt: skip
        elif isinstance(event, InputCommitted):
            self._send({"type": "input_audio_buffer.committed", "item_id": event.item_id,
                        "previous_item_id": self._last_item})  # fmt: skip
            self._user_item(event.item_id, [{"type": "input_audio", "transcript": None}])
        elif isinstance(event, InputCleared):
            self._send({"type": "input_audio_buffer.cleared"})
        elif isinstance(event, InputTranscript):
            self._send({"type": "conversation.item.input_audio_transcription.completed", "item_id": event.item_id,
                        "content_index": 0, "transcript": event.transcript})  # fmt: skip
        elif isinstance(event, ResponseCreated):
            self._response_created(event)
        elif isinstance(event, TranscriptDelta):
            st = self._responses.get(event.response_id)
            if st is not None:
                st.transcript += event.delta
                kind = "response.output_audio_transcript.delta" if st.audio else "response.output_text.delta"
                self._send({"type": kind, **self._where(st), "delta": event.delta})
        elif isinstance(event, AudioChunk):
            self._audio(event)
        elif isinstance(event, ResponseDone):
            self._response_done(event)
        elif isinstance(event, Interrupted):
            self._on_event("interrupt", self.session.config.interrupt_mode.value)
            self._send({"type": "omnivox.interrupt", "response_id": event.response_id, "phrase": event.phrase,
                        "detected_ms": event.detected_ms})  # fmt: skip
        elif isinstance(event, SessionError):
            self._error(event.code, event.message)

    def _user_item(self, item_id: str, content: list[dict[str, Any]]) -> None:
        item = {"id": item_id, "type": "message", "object": "realtime.item", "role": "user",
                "status": "completed", "content": content}  # fmt: skip
        self._send({"type": "conversation.item.added", "previous_item_id": self._last_item, "item": item})
        self._send({"type": "conversation.item.done", "previous_item_id": self._last_item, "item": item})
        self._last_item = item_id

    @staticmethod
    def _where(st: _ResponseState) -> dict[str, Any]:
        return {"response_id": st.response_id, "item_id": st.item_id, "output_index": 0, "content_index": 0}

    def _assistant_item(self, st: _ResponseState, status: str) -> dict[str, Any]:
        part: dict[str, Any] = (
            {"type": "output_audio", "transcript": st.transcript}
            if st.audio
            else {"type": "output_text", "text": st.transcript}
        )
        return {"id": st.item_id, "type": "message", "object": "realtime.item", "role": "assistant",
                "status": status, "content": [part] if status != "in_progress" else []}  # fmt: skip

    def _response_created(self, event: ResponseCreated) -> None:
        audio = event.audio_out
        st = _ResponseState(event.response_id, event.item_id, audio, event.task)
        self._responses[event.response_id] = st
        modalities = ["audio"] if audio else ["text"]
        self._send({"type": "response.created", "response": {
            "id": st.response_id, "object": "realtime.response", "status": "in_progress", "status_details": None,
            "output": [], "output_modalities": modalities, "usage": None}})  # fmt: skip
        item = self._assistant_item(st, "in_progress")
        self._send({"type": "conversation.item.added", "previous_item_id": self._last_item, "item": item})
        self._last_item = st.item_id
        self._send({"type": "response.output_item.added", "response_id": st.response_id, "output_index": 0,
                    "item": item})  # fmt: skip
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        self._send({"type": "response.content_part.added", **self._where(st), "part": part})

    def _audio(self, event: AudioChunk) -> None:
        st = self._responses.get(event.response_id)
        if st is None:
            return
        st.audio_ms += len(event.pcm) / 2 / OUTPUT_RATE * 1000
        if self.binary_audio:
            header = json.dumps({"response_id": event.response_id, "item_id": event.item_id, "seq": event.seq}).encode()
            self._enqueue(struct.pack("<I", len(header)) + header + event.pcm)
        else:
            self._send({"type": "response.output_audio.delta", **self._where(st),
                        "delta": base64.b64encode(event.pcm).decode("ascii")})  # fmt: skip

    def _response_done(self, event: ResponseDone) -> None:
        st = self._responses.pop(event.response_id, None)
        if st is None:
            return
        where = self._where(st)
        if st.audio:
            self._send({"type": "response.output_audio.done", **where})
            self._send({"type": "response.output_audio_transcript.done", **where, "transcript": st.transcript})
            part = {"type": "audio", "transcript": st.transcript}
        else:
            self._send({"type": "response.output_text.done", **where, "text": st.transcript})
            part = {"type": "text", "text": st.transcript}
        self._send({"type": "response.content_part.done", **where, "part": part})
        item = self._assistant_item(st, "completed" if event.status == "completed" else "incomplete")
        self._send(
            {"type": "response.output_item.done", "response_id": st.response_id, "output_index": 0, "item": item}
        )
        self._send({"type": "conversation.item.done", "previous_item_id": None, "item": item})
        self._assistant_items[st.item_id] = st
        details: dict[str, Any] | None = None
        if event.status == "cancelled":
            details = {"type": "cancelled", "reason": event.reason or "client_cancelled"}
        elif event.status == "incomplete":
            details = {"type": "incomplete", "reason": event.reason or "max_output_tokens"}
        elif event.status == "failed":
            details = {"type": "failed", "error": {"type": "server_error", "message": event.reason}}
        usage = event.usage or {}
        self._send({"type": "response.done", "response": {
            "id": st.response_id, "object": "realtime.response", "status": event.status, "status_details": details,
            "output": [item], "output_modalities": ["audio"] if st.audio else ["text"],
            "usage": {"total_tokens": usage.get("total_tokens", 0), "input_tokens": usage.get("input_tokens", 0),
                      "output_tokens": usage.get("output_tokens", 0)},
            "omnivox": {**event.timings, "audio_ms": round(st.audio_ms, 1), "task": st.task}}})  # fmt: skip
        self._on_event("response_done", event)

    # ---------------- input ----------------

    async def _on_binary(self, data: bytes) -> None:
        if not self.binary_audio:
            self._error("invalid_event", "binary frames need session.update omnivox.binary_audio=true first")
            return
        if len(data) % 2:
            self._error("invalid_audio", f"PCM16 audio needs an even number of bytes, got {len(data)}")
            return
        await asyncio.to_thread(self.session.append_audio, data)
        self._wake.set()

    async def _on_text(self, text: str) -> None:
        try:
            event = parse_client_event(text)
            await self._dispatch(event)
        except ProtocolError as e:
            self._send(error_event(e, self._new_event_id()))
        self._wake.set()

    async def _dispatch(self, ev: ClientEvent) -> None:
        s = self.session
        if isinstance(ev, AudioAppend):
            await asyncio.to_thread(s.append_audio, decode_audio(ev.audio, ev.event_id))
        elif isinstance(ev, SessionUpdate):
            self._update(ev)
        elif isinstance(ev, AudioCommit):
            await asyncio.to_thread(s.commit)
        elif isinstance(ev, AudioClear):
            await asyncio.to_thread(s.clear)
        elif isinstance(ev, ItemCreate):
            await self._item_create(ev)
        elif isinstance(ev, ResponseCreate):
            modalities = tuple(ev.response.output_modalities) if ev.response and ev.response.output_modalities else None
            if s.create_response(modalities) is None:
                self._wake.set()
        elif isinstance(ev, ResponseCancel):
            if not s.cancel_response("client_cancelled"):
                raise ProtocolError("response_cancel_not_active", "there is no response to cancel", None, ev.event_id)
        elif isinstance(ev, ItemTruncate):
            self._truncate(ev)
        elif isinstance(ev, Playback):
            s.report_playback(ev.played_ms)

    def _update(self, ev: SessionUpdate) -> None:
        cfg = self.session.config
        new: dict[str, Any] = {}
        sess = ev.session
        if sess.instructions is not None:
            self.instructions = sess.instructions  # Mini-Omni has no system prompt: kept and reported only
        if sess.output_modalities is not None:
            new["output_modalities"] = tuple(sess.output_modalities)
        audio = sess.audio
        if audio is not None and audio.input is not None:
            inp = audio.input
            if inp.format is not None:
                new["input_sample_rate"] = inp.format.rate
            if "turn_detection" in inp.model_fields_set:
                td = inp.turn_detection
                new["turn_detection"] = None if td is None else TurnDetection(
                    threshold=td.threshold, prefix_padding_ms=td.prefix_padding_ms,
                    silence_duration_ms=td.silence_duration_ms, create_response=td.create_response,
                    interrupt_response=td.interrupt_response)  # fmt: skip
            if "transcription" in inp.model_fields_set:
                new["transcribe_input"] = inp.transcription is not None
        if audio is not None and audio.output is not None and audio.output.format is not None:
            if audio.output.format.rate != OUTPUT_RATE:
                raise ProtocolError("invalid_event", "output audio is 24000 Hz PCM16 (SNAC's rate)",
                                    "session.audio.output.format.rate", ev.event_id)  # fmt: skip
        if sess.omnivox is not None:
            o = sess.omnivox
            if o.interrupt_mode is not None:
                new["interrupt_mode"] = InterruptMode(o.interrupt_mode)
            if o.interrupt_phrases is not None:
                new["interrupt_phrases"] = tuple(o.interrupt_phrases)
            if o.max_audio_lead_ms is not None:
                new["max_audio_lead_ms"] = float(o.max_audio_lead_ms)
            if o.binary_audio is not None:
                self.binary_audio = o.binary_audio
        try:
            config: SessionConfig = cfg.replace(**new)
        except ValueError as e:
            raise ProtocolError("invalid_event", str(e), "session", ev.event_id) from None
        self.session.update(config)
        self._send({"type": "session.updated", "session": self.session_view()})

    async def _item_create(self, ev: ItemCreate) -> None:
        item = ev.item
        if item.role == "system":
            self.instructions = " ".join(c.text or "" for c in item.content).strip()
            return
        # A user message: images (for the next audio turn), then at most one text or audio part.
        echoed: list[dict[str, Any]] = []
        item_id: str | None = None
        for i, part in enumerate(item.content):
            if part.type != "input_image":
                continue
            if not self.session.runner.model.takes_images:
                raise ProtocolError("image_not_supported", NO_IMAGES, f"item.content.{i}", ev.event_id)
            param = f"item.content.{i}.image_url"
            data = decode_image_url(part.image_url, param, ev.event_id)
            cfg = self.session.config
            try:  # decoded and resized off the event loop
                pixels = await asyncio.to_thread(image_pixels, data, cfg.max_image_bytes, cfg.max_image_pixels)
            except ImageError as e:
                raise ProtocolError("invalid_image", str(e), param, ev.event_id) from None
            item_id = self.session.add_image(pixels)
            if item_id is None:
                return
            echoed.append({"type": "input_image", "detail": part.detail or "auto"})  # the data is not echoed
        others = [(i, p) for i, p in enumerate(item.content) if p.type != "input_image"]
        if len(others) > 1:
            raise ProtocolError("invalid_event", "a message carries at most one text or audio part",
                                f"item.content.{others[1][0]}", ev.event_id)  # fmt: skip
        for i, part in others:
            if part.type == "input_text":
                if not part.text or not part.text.strip():
                    raise ProtocolError(
                        "invalid_event", "input_text needs a non-empty text", f"item.content.{i}.text", ev.event_id
                    )
                item_id = self.session.add_text(part.text)
                echoed.append({"type": "input_text", "text": part.text})
            else:
                if not part.audio:
                    raise ProtocolError("invalid_event", "input_audio needs audio", f"item.content.{i}.audio",
                                        ev.event_id)  # fmt: skip
                pcm = decode_audio(part.audio, ev.event_id)
                item_id = await asyncio.to_thread(self.session.add_audio, pcm)
                if item_id is None:
                    return
                echoed.append({"type": "input_audio", "transcript": None})
        if item_id is not None:
            self._user_item(item_id, echoed)

    def _truncate(self, ev: ItemTruncate) -> None:
        st = self._assistant_items.get(ev.item_id)
        if st is None:
            active = next((r for r in self._responses.values() if r.item_id == ev.item_id), None)
            if active is None:
                raise ProtocolError("invalid_event", f"no assistant item {ev.item_id!r}", "item_id", ev.event_id)
            st = active
        if st.audio_ms > 0 and ev.audio_end_ms < st.audio_ms:
            # The text runs ahead of the audio; keep the share of it the user heard.
            keep = int(len(st.transcript) * ev.audio_end_ms / st.audio_ms)
            st.transcript = st.transcript[:keep]
        self.session.report_playback(ev.audio_end_ms)
        self._send({"type": "conversation.item.truncated", "item_id": ev.item_id, "content_index": ev.content_index,
                    "audio_end_ms": ev.audio_end_ms})  # fmt: skip
