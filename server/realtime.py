"""The `/v1/realtime` WebSocket: one `Connection` per client, mapping the wire protocol
(shared/PROTOCOL.md) onto a `streaming.Session` and the session's typed events back.

The connection's tasks own the session (sans-I/O) and drive it on the event loop: client
events go in as they arrive; the compute of input audio (decode, resample, VAD) runs in a
worker thread, one call at a time; the runner's events, the recognizer's verdicts and the
end-of-turn model's scores are pushed onto the loop (`Driver.post`) and fed in as they come.
Nothing here waits on a lock or a queue that a worker holds. Outgoing events go through a
queue bounded in events and bytes: a client that stops reading is cut off (1008) when it
fills or when one send waits too long, without slowing anyone else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from model.codec import SNAC_SAMPLE_RATE
from model.vision import NO_IMAGES, ImageError, image_pixels
from streaming.audio_in import InvalidAudio
from streaming.config import InterruptMode, SessionConfig, TurnDetection
from streaming.detector import ASR_MODEL_NAME
from streaming.driver import Answer, AudioFrontEnd, Driver, TurnScored
from streaming.events import (
    AudioChunk,
    Event,
    InputCleared,
    InputCommitted,
    InputTimeout,
    InputTranscript,
    Interrupted,
    ResponseCreated,
    ResponseDone,
    ScoreTurn,
    SessionError,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
)
from streaming.g711 import G711Encoder
from streaming.runner import SERVER_ERROR_MESSAGE
from streaming.session import ACTIVE_RESPONSE, Session, active_response_message

from .playout import Played, PlayoutEvent, Started, Stopped
from .protocol import (
    AudioAppend,
    AudioClear,
    AudioCommit,
    ClientEvent,
    ContentIn,
    InputMessage,
    ItemCreate,
    ItemDelete,
    ItemIn,
    ItemReference,
    ItemRetrieve,
    ItemTruncate,
    OutputAudioClear,
    Playback,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    SemanticVadIn,
    ServerVadIn,
    SessionIn,
    SessionUpdate,
    decode_audio,
    decode_image_url,
    error_event,
    parse_client_event,
)
from .transport import MEDIA_INPUT_RATE, MediaAudio, Transport

if TYPE_CHECKING:
    from .app import Engine
    from .settings import ServerSettings

log = logging.getLogger("omnivox.server")

OUTPUT_RATE = SNAC_SAMPLE_RATE  # output audio/pcm is SNAC's own rate


MAX_ITEMS = 1024  # conversation items kept for retrieve/delete/previous_item_id (oldest dropped first)
CONVERSATION_ROOT = "root"  # previous_item_id that inserts at the beginning, as OpenAI's


@dataclass
class _ResponseState:
    response_id: str
    item_id: str
    audio: bool
    task: str = ""
    transcript: str = ""
    audio_ms: float = 0.0
    metadata: dict[str, Any] | None = None
    in_conversation: bool = True  # False: out-of-band (response.conversation "none")
    encoder: G711Encoder | None = None  # output audio in G.711
    truncated_at_ms: float | None = None  # conversation.item.truncate while it was still running


@dataclass
class _ResponseOptions:
    """What response.create asked for that only the transport needs."""

    metadata: dict[str, Any] | None
    in_conversation: bool


def _default_echo() -> dict[str, Any]:
    return {  # accepted session fields that change nothing here, echoed as sent
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "voice": "omni",
        "speed": 1.0,
        "noise_reduction": None,
        "transcription": None,
    }


@dataclass(frozen=True)
class SessionFields:
    """A session's configuration as the client sees it: the streaming config plus what only
    the wire knows. Pure data, so a client secret's config can be checked and shown before any
    session exists."""

    config: SessionConfig
    instructions: str = ""
    output_format: str = "audio/pcm"
    binary_audio: bool = False
    extensions: bool = False  # omnivox.* events only for a client that asked (any `omnivox` in session.update)
    echo: Mapping[str, Any] = field(default_factory=_default_echo)


def default_session_config(settings: ServerSettings) -> SessionConfig:
    """A new session's config: the server's defaults, before any session.update."""
    return SessionConfig(max_new_tokens=settings.max_new_tokens, max_audio_lead_ms=settings.max_audio_lead_ms)


def initial_fields(engine: Engine) -> SessionFields:
    return SessionFields(default_session_config(engine.settings))


def apply_session(fields: SessionFields, sess: SessionIn, event_id: str | None = None) -> SessionFields:
    """`session.update`'s `session` applied as a whole, or ProtocolError and nothing applied."""
    cfg = fields.config
    new: dict[str, Any] = {}
    echo = dict(fields.echo)
    output_format = fields.output_format
    if sess.output_modalities is not None:
        new["output_modalities"] = tuple(sess.output_modalities)
    for name in ("tools", "tool_choice", "max_output_tokens"):
        if name in sess.model_fields_set:
            echo[name] = getattr(sess, name)
    if sess.max_output_tokens is not None:
        new["max_new_tokens"] = None if sess.max_output_tokens == "inf" else sess.max_output_tokens
    audio = sess.audio
    if audio is not None and audio.input is not None:
        inp = audio.input
        if inp.format is not None:
            new["input_format"] = inp.format.type
            new["input_sample_rate"] = inp.format.sample_rate
        if "turn_detection" in inp.model_fields_set:
            new["turn_detection"] = _turn_detection(inp.turn_detection)
        if "transcription" in inp.model_fields_set:
            new["transcribe_input"] = inp.transcription is not None
            echo["transcription"] = None if inp.transcription is None else {
                **inp.transcription.model_dump(exclude_none=True), "model": ASR_MODEL_NAME}  # fmt: skip
        if "noise_reduction" in inp.model_fields_set:
            echo["noise_reduction"] = None if inp.noise_reduction is None else inp.noise_reduction.model_dump()
    if audio is not None and audio.output is not None:
        out = audio.output
        if out.format is not None:
            if out.format.type == "audio/pcm" and out.format.sample_rate != OUTPUT_RATE:
                raise ProtocolError("invalid_event", "output audio/pcm is 24000 Hz (SNAC's rate)",
                                    "session.audio.output.format.rate", event_id)  # fmt: skip
            output_format = out.format.type
        if out.voice is not None:
            echo["voice"] = out.voice
        if out.speed is not None:
            echo["speed"] = out.speed
    if sess.omnivox is not None:
        o = sess.omnivox
        if o.interrupt_mode is not None:
            new["interrupt_mode"] = InterruptMode(o.interrupt_mode)
        if o.interrupt_phrases is not None:
            new["interrupt_phrases"] = tuple(o.interrupt_phrases)
        if o.max_audio_lead_ms is not None:
            new["max_audio_lead_ms"] = float(o.max_audio_lead_ms)
        if "first_chunk_lookahead_frames" in o.model_fields_set:
            new["first_chunk_lookahead_frames"] = o.first_chunk_lookahead_frames
    try:
        config: SessionConfig = cfg.replace(**new)
    except ValueError as e:
        raise ProtocolError("invalid_event", str(e), "session", event_id) from None
    return replace(
        fields,
        config=config,
        # Mini-Omni has no system prompt: instructions are kept and reported only.
        instructions=sess.instructions if sess.instructions is not None else fields.instructions,
        output_format=output_format,
        binary_audio=(
            sess.omnivox.binary_audio
            if sess.omnivox is not None and sess.omnivox.binary_audio is not None
            else fields.binary_audio
        ),
        extensions=fields.extensions or "omnivox" in sess.model_fields_set,
        echo=echo,
    )


def session_view(fields: SessionFields, session_id: str, engine: Engine) -> dict[str, Any]:
    """The session object of session.created / session.updated (and of a client secret)."""
    cfg = fields.config
    td = cfg.turn_detection
    turn: dict[str, Any] | None
    if td is None:
        turn = None
    elif td.semantic:
        turn = {"type": "semantic_vad", "eagerness": td.eagerness, "create_response": td.create_response,
                "interrupt_response": td.interrupt_response}  # fmt: skip
    else:
        turn = {"type": "server_vad", "threshold": td.threshold, "prefix_padding_ms": td.prefix_padding_ms,
                "silence_duration_ms": td.silence_duration_ms, "idle_timeout_ms": td.idle_timeout_ms,
                "create_response": td.create_response, "interrupt_response": td.interrupt_response}  # fmt: skip
    e = fields.echo
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": engine.model.config.name,
        "output_modalities": list(cfg.output_modalities),
        "instructions": fields.instructions,
        "audio": {
            "input": {
                "format": _format_view(cfg.input_format, cfg.input_sample_rate),
                "turn_detection": turn,
                "transcription": e["transcription"],
                "noise_reduction": e["noise_reduction"],
            },
            "output": {
                "format": _format_view(fields.output_format, OUTPUT_RATE),
                "voice": e["voice"],
                "speed": e["speed"],
            },
        },
        "tools": e["tools"],
        "tool_choice": e["tool_choice"],
        "max_output_tokens": e["max_output_tokens"],
        "omnivox": {
            "interrupt_mode": cfg.interrupt_mode.value,
            "interrupt_phrases": list(cfg.interrupt_phrases),
            "binary_audio": fields.binary_audio,
            "max_audio_lead_ms": cfg.max_audio_lead_ms,
            "first_chunk_lookahead_frames": cfg.first_chunk_lookahead_frames,
            "demo_checkpoint": engine.demo,
            "model_family": engine.model.family,
            "images": engine.model.takes_images,  # input_image accepted (Mini-Omni2)
        },
    }


class _ConnectionDriver(Driver):
    """The end-of-turn model runs in a worker thread; its score comes back like every answer."""

    def score_turn(self, w: ScoreTurn) -> None:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.turn_probability, w.audio)
        future.add_done_callback(lambda f: self.post(TurnScored(w.ticket, None if f.exception() else f.result())))


class Connection:
    """One realtime session over one transport. `initial`: session configs applied, in order,
    before session.created (a client secret's, a WebRTC call's form field); checked already."""

    def __init__(
        self, transport: Transport, engine: Engine, session_id: str, initial: Sequence[SessionIn] = ()
    ) -> None:
        self.transport = transport
        self.player = transport.player
        self.engine = engine
        settings = engine.settings
        self.session_id = session_id
        self.model_name = engine.model.config.name
        self.demo = engine.demo
        self.session = Session(
            default_session_config(settings),
            takes_images=engine.model.takes_images,
            recognizer=engine.recognizer is not None,
            turn_model=engine.turn_model is not None,
        )
        self.front = self._front_end(self.session.config)
        # Answers from the runner/recognizer/turn-model threads; bounded by the runner's
        # unacknowledged-event limit and the recognizer's job list.
        self._answers: asyncio.Queue[Answer] = asyncio.Queue()
        self.driver = _ConnectionDriver(self.session, engine.runner, engine.recognizer, engine.turn_model, self._post)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.binary_audio = False
        self.instructions = ""
        self._out: asyncio.Queue[str | bytes | None] = asyncio.Queue(maxsize=settings.send_buffer_events)
        self._out_bytes = 0  # queued, not yet handed to the socket
        self._max_out_bytes = settings.send_buffer_bytes
        self._send_timeout_s = settings.send_timeout_s
        self._sending_since: float | None = None  # a send the client has not taken yet started then
        self._ids = itertools.count(1)
        self._responses: dict[str, _ResponseState] = {}
        self._response_options: dict[str, _ResponseOptions] = {}
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()  # the conversation, in order
        self._assistant_items: OrderedDict[str, _ResponseState] = OrderedDict()
        self.extensions = False  # omnivox.* events only for a client that asked (any `omnivox` in session.update)
        self.output_format = "audio/pcm"
        self._echo: dict[str, Any] = _default_echo()
        self._on_event = engine.on_event
        self._closing = False
        self._cut_off: asyncio.Task[None] | None = None
        fields = self._fields()
        for sess in initial:
            fields = apply_session(fields, sess)
        self._apply(fields)
        if self.player is not None:
            self.player.listen(self._on_playout)

    # ---------------- lifecycle ----------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._send({"type": "session.created", "session": self.session_view()})
        sender = asyncio.create_task(self._sender())
        pump = asyncio.create_task(self._pump())
        watchdog = asyncio.create_task(self._watch_sends())
        try:
            await self._receiver()
        finally:
            self._closing = True
            for task in (pump, watchdog, sender):
                task.cancel()
            live = self.session.response
            self.driver.close()  # the runner ends what runs for this session; nobody reads its end
            if live is not None:
                self._on_event("response_done", ResponseDone(live.response_id, live.item_id, "cancelled",
                                                             live.cancelled or "client_cancelled"))  # fmt: skip
            for task in (pump, watchdog, sender):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self._cut_off is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._cut_off
            # What the client never took (up to the send buffer's bytes) goes now, not when a
            # full collection gets to this connection's reference cycles.
            self._drop_unsent()

    async def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.transport.close(code, reason), self._send_timeout_s)

    async def _receiver(self) -> None:
        while not self._closing:
            message = await self.transport.receive()
            if message is None:
                return
            try:
                if isinstance(message, MediaAudio):
                    await self._append(message.pcm)
                elif isinstance(message, bytes):
                    await self._on_binary(message)
                else:
                    await self._on_text(message)
            except Exception:  # ours, not the client's: the event fails, the session lives
                log.exception("session %s: handling a client frame failed", self.session_id)
                self._send(error_event(ProtocolError("server_error", SERVER_ERROR_MESSAGE, error_type="server_error"),
                                       self._new_event_id()))  # fmt: skip
            self._flush()

    async def _sender(self) -> None:
        while True:
            item = await self._out.get()
            if item is None:
                return
            self._sending_since = time.monotonic()
            try:
                if isinstance(item, bytes):
                    await self.transport.send_bytes(item)
                else:
                    await self.transport.send_text(item)
            except Exception:
                return
            finally:
                self._sending_since = None
                self._out_bytes -= len(item)

    async def _watch_sends(self) -> None:
        """A send the client does not take within send_timeout_s cuts it off (it stopped reading)."""
        while not self._closing:
            await asyncio.sleep(min(1.0, self._send_timeout_s / 4))
            since = self._sending_since
            if since is not None and time.monotonic() - since > self._send_timeout_s:
                self._cut(f"the client took no data for {self._send_timeout_s:.0f} s")

    def _post(self, answer: Answer) -> None:
        """Called on the runner's, the recognizer's and executor threads: hand over, never block."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody listens
                loop.call_soon_threadsafe(self._answers.put_nowait, answer)

    async def _pump(self) -> None:
        """Feed the answers into the session as they are pushed; run the session's timers."""
        while not self._closing:
            deadline = self.session.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                first = await asyncio.wait_for(self._answers.get(), timeout)
            except TimeoutError:
                first = None
            self._feed_waiting(first)

    def _feed_waiting(self, first: Answer | None = None) -> None:
        answers = [] if first is None else [first]
        while not self._answers.empty():
            answers.append(self._answers.get_nowait())
        if answers:
            self.driver.feed(answers)
        self.session.tick(time.monotonic())
        self._flush()

    def _flush(self) -> None:
        """The session's work to the engines, its events to the wire."""
        self.driver.perform()
        for event in self.session.take_events():
            self._map_event(event)

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
        if self._out_bytes + len(data) > self._max_out_bytes or self._out.full():
            self._cut("its send buffer is full")
            return
        self._out_bytes += len(data)
        self._out.put_nowait(data)

    def _cut(self, why: str) -> None:
        """A client that stopped reading: what waits for it is dropped, the session ends (1008)."""
        if self._closing:
            return
        log.warning("session %s: the client is not reading (%s); disconnecting", self.session_id, why)
        self._closing = True
        self._drop_unsent()
        self._cut_off = asyncio.get_running_loop().create_task(self._close_slow_client())

    def _drop_unsent(self) -> None:
        while not self._out.empty():
            self._out.get_nowait()
        self._out_bytes = 0

    async def _close_slow_client(self) -> None:
        # The close frame waits behind what the client has not read; if it never reads again, the
        # handler ends anyway and the server drops the connection.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.transport.close(1008, "the client is not reading"), self._send_timeout_s)

    def _error(self, code: str, message: str, param: str | None = None, event_id: str | None = None) -> None:
        kind = "server_error" if code == "server_error" else "invalid_request_error"  # whose fault, as OpenAI
        self._send(error_event(ProtocolError(code, message, param, event_id, error_type=kind), self._new_event_id()))

    def _fields(self) -> SessionFields:
        return SessionFields(self.session.config, self.instructions, self.output_format, self.binary_audio,
                             self.extensions, self._echo)  # fmt: skip

    def session_view(self) -> dict[str, Any]:
        return session_view(self._fields(), self.session_id, self.engine)

    # ---------------- the conversation ----------------

    @property
    def _last_item(self) -> str | None:
        return next(reversed(self._items)) if self._items else None

    def _add_item(self, item: dict[str, Any], previous_item_id: str | None = None) -> str | None:
        """Insert an item after `previous_item_id` (the end when None, the start for "root");
        returns the id of the item now before it."""
        item_id = item["id"]
        if previous_item_id is None or previous_item_id == self._last_item:
            before = self._last_item
            self._items[item_id] = item
        else:
            order = list(self._items.items())
            at = 0 if previous_item_id == CONVERSATION_ROOT else [k for k, _ in order].index(previous_item_id) + 1
            order.insert(at, (item_id, item))
            self._items = OrderedDict(order)
            before = None if at == 0 else order[at - 1][0]
        while len(self._items) > MAX_ITEMS:
            old, _ = self._items.popitem(last=False)
            self.session.forget(old)
        return before

    def _announce_item(self, item: dict[str, Any], previous_item_id: str | None = None) -> None:
        before = self._add_item(item, previous_item_id)
        self._send({"type": "conversation.item.added", "previous_item_id": before, "item": item})
        self._send({"type": "conversation.item.done", "previous_item_id": before, "item": item})

    def _user_item(self, item_id: str, content: list[dict[str, Any]], previous_item_id: str | None = None) -> None:
        item = {"id": item_id, "type": "message", "object": "realtime.item", "role": "user",
                "status": "completed", "content": content}  # fmt: skip
        self._announce_item(item, previous_item_id)

    def _answerable_item(self) -> str | None:
        """Mini-Omni answers one user turn: the latest user item the session still holds."""
        for item_id in reversed(self._items):
            if self._items[item_id]["role"] == "user" and self.session.has_input(item_id):
                return item_id
        return None

    # ---------------- session events -> wire ----------------

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
        elif isinstance(event, InputTimeout):
            self._send({"type": "input_audio_buffer.timeout_triggered", "item_id": event.item_id,
                        "audio_start_ms": event.audio_start_ms, "audio_end_ms": event.audio_end_ms})  # fmt: skip
        elif isinstance(event, InputTranscript):
            self._input_transcript(event)
        elif isinstance(event, ResponseCreated):
            self._response_created(event)
        elif isinstance(event, TranscriptDelta):
            st = self._responses.get(event.response_id)
            if st is not None:
                kind = "response.output_audio_transcript.delta" if st.audio else "response.output_text.delta"
                self._send({"type": kind, **self._where(st), "delta": event.delta})
        elif isinstance(event, AudioChunk):
            self._audio(event)
        elif isinstance(event, ResponseDone):
            self._response_done(event)
        elif isinstance(event, Interrupted):
            self._clear_playout()
            self._on_event("interrupt", self.session.config.interrupt_mode.value)
            if self.extensions:
                self._send({"type": "omnivox.interrupt", "response_id": event.response_id, "phrase": event.phrase,
                            "detected_ms": event.detected_ms})  # fmt: skip
        elif isinstance(event, SessionError):
            self._error(event.code, event.message)

    def _input_transcript(self, event: InputTranscript) -> None:
        where = {"item_id": event.item_id, "content_index": 0}
        if event.failed:
            self._send({"type": "conversation.item.input_audio_transcription.failed", **where, "error": {
                "type": "transcription_error", "code": "transcription_failed",
                "message": "the speech recognizer could not transcribe this audio", "param": None}})  # fmt: skip
            return
        item = self._items.get(event.item_id)
        if item is not None and item["content"]:
            item["content"][0]["transcript"] = event.transcript
        self._send({"type": "conversation.item.input_audio_transcription.delta", **where, "delta": event.transcript})
        self._send({"type": "conversation.item.input_audio_transcription.completed", **where,
                    "transcript": event.transcript,
                    "usage": {"type": "duration", "seconds": round(event.audio_ms / 1000, 3)}})  # fmt: skip

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

    def _response_object(self, st: _ResponseState, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": st.response_id,
            "object": "realtime.response",
            "status": status,
            "status_details": None,
            "output": output,
            "output_modalities": ["audio"] if st.audio else ["text"],
            "conversation_id": f"conv_{self.session_id[5:]}" if st.in_conversation else None,
            "metadata": st.metadata,
            "usage": None,
        }

    def _response_created(self, event: ResponseCreated) -> None:
        opts = self._response_options.pop(event.response_id, None) or _ResponseOptions(None, True)
        st = _ResponseState(event.response_id, event.item_id, event.audio_out, event.task,
                            metadata=opts.metadata, in_conversation=opts.in_conversation)  # fmt: skip
        if st.audio and self.output_format != "audio/pcm":
            st.encoder = G711Encoder(self.output_format)
        self._responses[event.response_id] = st
        self._send({"type": "response.created", "response": self._response_object(st, "in_progress", [])})
        item = self._assistant_item(st, "in_progress")
        self._send({"type": "response.output_item.added", "response_id": st.response_id, "output_index": 0,
                    "item": item})  # fmt: skip
        if st.in_conversation:
            before = self._add_item(item)
            self._send({"type": "conversation.item.added", "previous_item_id": before, "item": item})
        part = {"type": "audio", "transcript": ""} if st.audio else {"type": "text", "text": ""}
        self._send({"type": "response.content_part.added", **self._where(st), "part": part})

    def _audio(self, event: AudioChunk) -> None:
        st = self._responses.get(event.response_id)
        if st is None:
            return
        if self.player is not None:  # WebRTC: on the media track, not in events (as OpenAI)
            if self.player.response_id not in (None, st.response_id):
                self._clear_playout()  # a new answer replaces the tail of the last one
            self.player.push(st.response_id, event.pcm)
            return
        self._send_audio(st, event.pcm if st.encoder is None else st.encoder.encode(event.pcm), event.seq)

    def _send_audio(self, st: _ResponseState, data: bytes, seq: int) -> None:
        if not data:
            return
        if self.binary_audio:
            header = json.dumps({"response_id": st.response_id, "item_id": st.item_id, "seq": seq}).encode()
            self._enqueue(struct.pack("<I", len(header)) + header + data)
        else:
            self._send({"type": "response.output_audio.delta", **self._where(st),
                        "delta": base64.b64encode(data).decode("ascii")})  # fmt: skip

    def _response_done(self, event: ResponseDone) -> None:
        st = self._responses.pop(event.response_id, None)
        if st is None:
            return
        # What the client received (the session's count): the item keeps it.
        st.transcript, st.audio_ms = event.transcript, event.audio_ms
        if self.player is not None and self.player.response_id == st.response_id:
            if event.status == "cancelled":
                self._clear_playout(st)
            else:
                self.player.end(st.response_id)  # output_audio_buffer.stopped once it has played
        if st.truncated_at_ms is not None:
            self._cut_transcript(st, st.truncated_at_ms)
        where = self._where(st)
        if st.audio:
            if st.encoder is not None:
                self._send_audio(st, st.encoder.flush(), -1)
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
        if st.in_conversation and st.item_id in self._items:
            self._items[st.item_id] = item
            self._send({"type": "conversation.item.done", "previous_item_id": self._previous_of(st.item_id),
                        "item": item})  # fmt: skip
            self._assistant_items[st.item_id] = st
            while len(self._assistant_items) > MAX_ITEMS:
                self._assistant_items.popitem(last=False)
        details: dict[str, Any] | None = None
        if event.status == "cancelled":
            details = {"type": "cancelled", "reason": event.reason or "client_cancelled"}
        elif event.status == "incomplete":
            details = {"type": "incomplete", "reason": event.reason or "max_output_tokens"}
        elif event.status == "failed":
            details = {"type": "failed", "error": {"type": "server_error", "message": event.reason}}
        usage = event.usage or {}
        response = self._response_object(st, event.status, [item])
        response["status_details"] = details
        response["usage"] = {"total_tokens": usage.get("total_tokens", 0),
                             "input_tokens": usage.get("input_tokens", 0),
                             "output_tokens": usage.get("output_tokens", 0)}  # fmt: skip
        if self.extensions:
            response["omnivox"] = {**event.timings, "audio_ms": round(st.audio_ms, 1), "task": st.task}
        self._send({"type": "response.done", "response": response})
        self._on_event("response_done", event)

    # ---------------- output audio on a media track (WebRTC) ----------------

    def _clear_playout(self, st: _ResponseState | None = None) -> None:
        """Drop the queued audio at once; the answer keeps what was played of it."""
        if self.player is None:
            return
        played = self.player.clear()
        if played is None:
            return
        st = st or self._responses.get(played.response_id)
        if st is not None and st.truncated_at_ms is None:
            st.truncated_at_ms = played.played_ms  # applied to the transcript when it ends
        self._send({"type": "output_audio_buffer.cleared", "response_id": played.response_id})

    def _on_playout(self, event: PlayoutEvent) -> None:
        """From the media track's clock, on the event loop: what the peer has been sent to play."""
        if self._closing:
            return
        if isinstance(event, Started):
            self._send({"type": "output_audio_buffer.started", "response_id": event.response_id})
        elif isinstance(event, Stopped):
            self._send({"type": "output_audio_buffer.stopped", "response_id": event.response_id})
        elif isinstance(event, Played):
            r = self.session.response
            # Only while the answer runs: after its end the session already counts the whole of it.
            if r is not None and r.response_id == event.response_id:
                self.session.report_playback(event.played_ms, time.monotonic())
                self._flush()

    def _previous_of(self, item_id: str) -> str | None:
        before = None
        for key in self._items:
            if key == item_id:
                return before
            before = key
        return None

    # ---------------- input ----------------

    async def _on_binary(self, data: bytes) -> None:
        if not self.binary_audio:
            self._error("invalid_event", "binary frames need session.update omnivox.binary_audio=true first")
            return
        await self._append(data)

    async def _append(self, data: bytes) -> None:
        """Input audio: decoded, resampled and VAD-scored off the loop, then into the session."""
        try:
            audio16, probs = await asyncio.to_thread(self.front.process, data)
        except InvalidAudio as e:
            self._error("invalid_audio", str(e))
            return
        self.session.receive_audio(audio16, probs, time.monotonic())

    async def _on_text(self, text: str) -> None:
        try:
            event = parse_client_event(text)
            await self._dispatch(event)
        except ProtocolError as e:  # the client's mistake: one line, no traceback
            log.warning("session %s: %s (%s)", self.session_id, e.message, e.code)
            self._send(error_event(e, self._new_event_id()))

    async def _dispatch(self, ev: ClientEvent) -> None:
        s = self.session
        now = time.monotonic()
        if not isinstance(ev, AudioAppend):
            self._feed_waiting()  # the conversation as it stands (e.g. a response that just ended) comes first
        if isinstance(ev, AudioAppend):
            even = s.config.input_format == "audio/pcm"
            if len(ev.audio) > 1024 * 1024:  # base64 of a big append: decoded off the loop
                pcm = await asyncio.to_thread(decode_audio, ev.audio, ev.event_id, even=even)
            else:
                pcm = decode_audio(ev.audio, ev.event_id, even=even)
            await self._append(pcm)
        elif isinstance(ev, SessionUpdate):
            self._update(ev)
        elif isinstance(ev, AudioCommit):
            s.commit(now)
        elif isinstance(ev, AudioClear):
            s.clear()
        elif isinstance(ev, ItemCreate):
            await self._item_create(ev)
        elif isinstance(ev, ItemRetrieve):
            item = self._items.get(ev.item_id)
            if item is None:
                raise ProtocolError("item_retrieve_invalid_item_id", f"Item with item_id not found: {ev.item_id}",
                                    "item_id", ev.event_id)  # fmt: skip
            self._send({"type": "conversation.item.retrieved", "item": item})
        elif isinstance(ev, ItemDelete):
            if ev.item_id not in self._items:
                raise ProtocolError("item_delete_invalid_item_id", f"Item with item_id not found: {ev.item_id}",
                                    "item_id", ev.event_id)  # fmt: skip
            del self._items[ev.item_id]
            s.forget(ev.item_id)
            self._send({"type": "conversation.item.deleted", "item_id": ev.item_id})
        elif isinstance(ev, ResponseCreate):
            await self._response_create(ev)
        elif isinstance(ev, ResponseCancel):
            current = s.responding
            if current is None or (ev.response_id is not None and ev.response_id != current):
                raise ProtocolError("response_cancel_not_active", "Cancellation failed: no active response found",
                                    None, ev.event_id)  # fmt: skip
            s.cancel_response("client_cancelled")
            self._clear_playout()
        elif isinstance(ev, OutputAudioClear):
            if self.player is None:
                raise ProtocolError("invalid_event", "output_audio_buffer.clear is for WebRTC calls only", "type",
                                    ev.event_id)  # fmt: skip
            # As OpenAI: the audio stops, and so does its generation.
            if s.responding is not None:
                s.cancel_response("client_cancelled")
            self._clear_playout()
        elif isinstance(ev, ItemTruncate):
            self._truncate(ev)
        elif isinstance(ev, Playback):
            s.report_playback(ev.played_ms, now)

    def _update(self, ev: SessionUpdate) -> None:
        self._apply(apply_session(self._fields(), ev.session, ev.event_id))
        self._send({"type": "session.updated", "session": self.session_view()})

    def _apply(self, fields: SessionFields) -> None:
        # Accepted as a whole: nothing changes the session before the update is known valid.
        self.extensions = fields.extensions
        self.instructions = fields.instructions
        self.binary_audio = fields.binary_audio
        self._echo = dict(fields.echo)
        self.output_format = fields.output_format
        if self.session.update(fields.config):
            self.front = self._front_end(fields.config)  # the input starts afresh

    def _front_end(self, config: SessionConfig) -> AudioFrontEnd:
        if self.player is not None:
            # A media track's audio comes resampled to 24 kHz PCM16, whatever the session's
            # input format says (that one is for input_audio_buffer.append).
            config = config.replace(input_format="audio/pcm", input_sample_rate=MEDIA_INPUT_RATE)
        return AudioFrontEnd(self.engine.vad, config)

    async def _item_create(self, ev: ItemCreate) -> None:
        item = ev.item
        if item.id is not None and item.id in self._items:
            raise ProtocolError("item_create_duplicate_item_id", f"Item with id {item.id} already exists",
                                "item.id", ev.event_id)  # fmt: skip
        previous = ev.previous_item_id
        if previous is not None and previous != CONVERSATION_ROOT and previous not in self._items:
            raise ProtocolError("item_create_invalid_previous_item_id",
                                f"Previous item with id {previous} not found", "previous_item_id",
                                ev.event_id)  # fmt: skip
        if item.role != "user":
            # Stored and echoed; Mini-Omni answers user turns only (README: conversation items).
            content = [_stored_part(p) for p in item.content]
            stored = {"id": item.id or self._new_item_id(), "type": "message", "object": "realtime.item",
                      "role": item.role, "status": "completed", "content": content}  # fmt: skip
            self._announce_item(stored, previous)
            return
        item_id, echoed = await self._user_content(item, ev.event_id, item.id)
        if item_id is not None:
            self._user_item(item_id, echoed, previous)

    async def _user_content(
        self, item: ItemIn, event_id: str | None, item_id: str | None
    ) -> tuple[str | None, list[dict[str, Any]]]:
        """Hand a user message's content to the session: images (for the next audio turn), then
        at most one text or audio part. Returns the item id the session holds and the echo."""
        echoed: list[dict[str, Any]] = []
        for i, part in enumerate(item.content):
            if part.type != "input_image":
                continue
            if not self.engine.model.takes_images:
                raise ProtocolError("image_not_supported", NO_IMAGES, f"item.content.{i}", event_id)
            param = f"item.content.{i}.image_url"
            data = decode_image_url(part.image_url, param, event_id)
            cfg = self.session.config
            try:  # decoded and resized off the event loop
                pixels = await asyncio.to_thread(image_pixels, data, cfg.max_image_bytes, cfg.max_image_pixels)
            except ImageError as e:
                raise ProtocolError("invalid_image", str(e), param, event_id) from None
            item_id = self.session.add_image(pixels, item_id)
            if item_id is None:
                return None, echoed
            echoed.append({"type": "input_image", "detail": part.detail or "auto"})  # the data is not echoed
        others = [(i, p) for i, p in enumerate(item.content) if p.type != "input_image"]
        if len(others) > 1:
            raise ProtocolError("invalid_event", "a message carries at most one text or audio part",
                                f"item.content.{others[1][0]}", event_id)  # fmt: skip
        for i, part in others:
            if part.type == "input_text":
                if not part.text or not part.text.strip():
                    raise ProtocolError("invalid_event", "input_text needs a non-empty text",
                                        f"item.content.{i}.text", event_id)  # fmt: skip
                item_id = self.session.add_text(part.text, time.monotonic(), item_id=item_id)
                echoed.append({"type": "input_text", "text": part.text})
            else:
                if not part.audio:
                    raise ProtocolError("invalid_event", "input_audio needs audio", f"item.content.{i}.audio",
                                        event_id)  # fmt: skip
                data = decode_audio(part.audio, event_id, even=self.session.config.input_format == "audio/pcm")
                try:
                    # A call's stream front end takes the track's rate; a message is in the session's format.
                    front = self.front if self.player is None else AudioFrontEnd(self.engine.vad, self.session.config)
                    audio16 = await asyncio.to_thread(front.whole, data)
                except InvalidAudio as e:
                    raise ProtocolError("invalid_audio", str(e), f"item.content.{i}.audio", event_id) from None
                item_id = self.session.add_audio(audio16, item_id)
                if item_id is None:
                    return None, echoed
                echoed.append({"type": "input_audio", "transcript": part.transcript})
        return item_id, echoed

    async def _response_create(self, ev: ResponseCreate) -> None:
        s = self.session
        r = ev.response
        if s.responding is not None:  # checked first: nothing of this request may touch the session
            raise ProtocolError(ACTIVE_RESPONSE, active_response_message(s.responding), None, ev.event_id)
        modalities = tuple(r.output_modalities) if r and r.output_modalities else None
        max_tokens = r.max_output_tokens if r else None
        max_new = None if max_tokens is None or max_tokens == "inf" else int(max_tokens)
        item_id: str | None
        if r is not None and r.input is not None:
            item_id = await self._response_input(r.input, ev.event_id)
        else:
            item_id = self._answerable_item()
        if item_id is None and r is not None and r.instructions and r.instructions.strip():
            # Nothing to answer but instructions (e.g. "greet the user"): Mini-Omni answers them as text.
            item_id = s.add_text(r.instructions.strip(), time.monotonic(), item_id=self._new_item_id())
        if item_id is None:
            raise ProtocolError("invalid_request",
                                "there is no user input to respond to: Mini-Omni answers a user message "
                                "(audio or text) or the response's instructions", "response", ev.event_id)  # fmt: skip
        in_conversation = r is None or r.conversation != "none"
        metadata = r.metadata if r is not None else None
        response_id = s.create_response(time.monotonic(), modalities, item_id=item_id, max_new_tokens=max_new)
        if response_id is not None:
            self._response_options[response_id] = _ResponseOptions(metadata, in_conversation)

    async def _response_input(self, items: list[InputMessage | ItemReference], event_id: str | None) -> str | None:
        """response.input: the latest user message of it is what Mini-Omni answers."""
        for i in range(len(items) - 1, -1, -1):
            entry = items[i]
            if isinstance(entry, ItemReference):
                ref = self._items.get(entry.id)
                if ref is None:
                    raise ProtocolError("invalid_event", f"no conversation item {entry.id!r}",
                                        f"response.input.{i}.id", event_id)  # fmt: skip
                if ref["role"] == "user" and self.session.has_input(entry.id):
                    return entry.id
            elif entry.role == "user":
                item_id, _ = await self._user_content(entry, event_id, self._new_item_id())
                return item_id
        return None

    def _new_item_id(self) -> str:
        return f"item_{self.session_id[-8:]}{next(self._ids):06d}"

    def _truncate(self, ev: ItemTruncate) -> None:
        st = self._assistant_items.get(ev.item_id)
        if st is not None:
            self._cut_transcript(st, ev.audio_end_ms)
        else:
            st = next((r for r in self._responses.values() if r.item_id == ev.item_id), None)
            if st is None:
                raise ProtocolError("item_truncate_invalid_item_id", f"no assistant audio item {ev.item_id!r}",
                                    "item_id", ev.event_id)  # fmt: skip
            st.truncated_at_ms = ev.audio_end_ms  # applied when it ends
        self.session.report_playback(ev.audio_end_ms, time.monotonic())
        self._send({"type": "conversation.item.truncated", "item_id": ev.item_id, "content_index": ev.content_index,
                    "audio_end_ms": ev.audio_end_ms})  # fmt: skip

    def _cut_transcript(self, st: _ResponseState, audio_end_ms: float) -> None:
        if st.audio_ms > 0 and audio_end_ms < st.audio_ms:
            # The text runs ahead of the audio; keep the share of it the user heard.
            st.transcript = st.transcript[: int(len(st.transcript) * audio_end_ms / st.audio_ms)]
            stored = self._items.get(st.item_id)
            if stored is not None and stored["content"]:
                stored["content"][0]["transcript"] = st.transcript


def _format_view(fmt: str, rate: int) -> dict[str, Any]:
    return {"type": fmt, "rate": rate} if fmt == "audio/pcm" else {"type": fmt}


def _turn_detection(td: ServerVadIn | SemanticVadIn | None) -> TurnDetection | None:
    if td is None:
        return None
    if isinstance(td, SemanticVadIn):
        return TurnDetection(type="semantic_vad", eagerness=td.eagerness, create_response=td.create_response,
                             interrupt_response=td.interrupt_response)  # fmt: skip
    return TurnDetection(threshold=td.threshold, prefix_padding_ms=td.prefix_padding_ms,
                         silence_duration_ms=td.silence_duration_ms, idle_timeout_ms=td.idle_timeout_ms,
                         create_response=td.create_response, interrupt_response=td.interrupt_response)  # fmt: skip


def _stored_part(part: ContentIn) -> dict[str, Any]:
    """A system/assistant message part as the conversation keeps it (no audio bytes)."""
    if part.type in ("output_text", "text"):
        return {"type": "output_text", "text": part.text or ""}
    if part.type == "output_audio":
        return {"type": "output_audio", "transcript": part.transcript or ""}
    return {"type": "input_text", "text": part.text or ""}
