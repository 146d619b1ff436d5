"""Client events of the OpenAI Realtime API (GA names) plus `omnivox.*`, as pydantic models.

Parsing never raises past `parse_client_event`: every failure becomes a `ProtocolError`
carrying the wire error code (shared/PROTOCOL.md, "Bad input"), the offending field and
the client's event_id.

Validation is strict: a field takes its JSON type only (no "5" for 5, no 1 for true; 300.0
counts as the integer 300, as JSON has one number type). Every string field has a maximum
length, every number a range, and free-form JSON (tools, tool_choice) a depth and a string
limit; the limits are the constants below (README, "Limits").
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from streaming.config import IDLE_TIMEOUT_MS_RANGE, PREFIX_PADDING_MS_RANGE, SILENCE_DURATION_MS_RANGE, TurnDetection
from streaming.detector import normalize

# ---------------- limits (README, "Limits") ----------------

# Numbers anywhere in an event, fields omnivox ignores included: integers within JSON's
# interoperable range (RFC 7493: what an IEEE double holds exactly), floats finite.
# NaN/Infinity are not JSON at all (invalid_json).
MAX_JSON_INT = 2**53 - 1
MAX_EVENT_ID_CHARS = 512  # echoed in every error about the event: bounded so errors stay small
MAX_ID_CHARS = 64  # item ids, previous_item_id, item_reference ids, response_id (OpenAI documents none)
# session/response instructions. Mini-Omni has no system prompt: session instructions are only
# stored and echoed (in every session.updated), response instructions with nothing else to answer
# are read as a text turn (2048-token window, so a few KiB at most ever reach the model). 64 KiB
# fits any prompt written for another model while bounding what each session keeps and echoes.
MAX_INSTRUCTIONS_CHARS = 64 * 1024
MAX_TEXT_CHARS = 20_000  # a text part's text, an audio part's transcript (over twice the 2048-token window)
MAX_AUDIO_CHARS = 15 * 1024 * 1024  # base64 audio per append or input_audio part (OpenAI: up to 15 MiB)
MAX_IMAGE_URL_CHARS = 14 * 1024 * 1024  # data: URL; the decoded image is capped at 10 MiB (model.vision)
MAX_CONTENT_PARTS = 16  # content parts of one message item
MAX_RESPONSE_INPUT_ITEMS = 64  # response.input entries
MAX_METADATA_PAIRS = 16  # response.metadata, OpenAI's limits
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_INTERRUPT_PHRASES = 32  # omnivox.interrupt_phrases
MAX_INTERRUPT_PHRASE_CHARS = 100  # each must keep a letter or digit once normalized (lowercase a-z 0-9 ')
MAX_VOICE_CHARS = 100
MAX_TRANSCRIPTION_MODEL_CHARS = 200
MAX_LANGUAGE_CHARS = 20
MAX_TRANSCRIPTION_PROMPT_CHARS = 4000
MAX_TOOLS = 128  # tools and tool_choice are accepted and echoed; Mini-Omni calls no tools
MAX_TOOL_NAME_CHARS = 64  # OpenAI's function name limit
MAX_JSON_DEPTH = 32  # levels of objects/arrays in a tool (itself and its JSON-schema parameters) or tool_choice
MAX_JSON_STRING_CHARS = 16 * 1024  # any string inside a tool or tool_choice (descriptions, schema text)
MAX_MS = 24 * 3600 * 1000  # audio_end_ms, played_ms: a day of audio
MAX_OUTPUT_TOKENS = 4096
# Parsing cost grows with the number of JSON values, not bytes: 14 MiB of small arrays holds the
# event loop for seconds. Only audio and images make legitimate events this large, and they are
# a handful of values, so a frame over BIG_FRAME_CHARS may hold at most MAX_BIG_FRAME_VALUES
# values (counted, before parsing, as its commas and opening brackets, inside strings too).
BIG_FRAME_CHARS = 1024 * 1024
MAX_BIG_FRAME_VALUES = 100_000


class ProtocolError(Exception):
    """An `error` event to send. `error_type` is OpenAI's: "invalid_request_error" for what the
    client sent, "server_error" for a failure of ours while handling it."""

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        event_id: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.event_id = event_id
        self.error_type = error_type


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode_ok(s: str) -> bool:
    """False for a string holding a lone surrogate (a JSON escape like \\ud800): not text, and
    nothing that must go back to the client (as an echo or in an error) may carry one."""
    return s.isascii() or _SURROGATE.search(s) is None


def _printable(s: str, limit: int = 80) -> str:
    """A client-chosen string as it may appear in an error's message or param."""
    s = s[:limit] + ("..." if len(s) > limit else "")
    return s if _unicode_ok(s) else _SURROGATE.sub("\ufffd", s)


def _integral(v: Any) -> Any:
    """JSON has one number type: 300.0 is the integer 300 (as JSON Schema reads it)."""
    if type(v) is float and v.is_integer():
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_integral)]


def _check_free_json(value: Any) -> None:
    """Free-form JSON (tools, tool_choice): bounded depth, bounded valid strings."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, (dict, list)) and depth >= MAX_JSON_DEPTH:
            raise ValueError(f"{path}: more than {MAX_JSON_DEPTH} levels of objects and arrays")
        if isinstance(v, str):
            if len(v) > MAX_JSON_STRING_CHARS:
                raise ValueError(f"{path or 'value'}: a string longer than {MAX_JSON_STRING_CHARS} characters")
            if not _unicode_ok(v):
                raise ValueError(f"{path or 'value'}: a string with an unpaired surrogate")
        elif isinstance(v, dict):
            for k, x in v.items():
                if len(k) > MAX_JSON_STRING_CHARS or not _unicode_ok(k):
                    raise ValueError(f"{path or 'value'}: a key too long or with an unpaired surrogate")
                stack.append((x, depth + 1, f"{path}.{_printable(k, 40)}" if path else _printable(k, 40)))
        elif isinstance(v, list):
            stack.extend((x, depth + 1, f"{path}.{i}" if path else str(i)) for i, x in enumerate(v))


def _shaped(adapter: TypeAdapter[Any]) -> Any:
    """An AfterValidator: `value` (kept as the client's dict, as it is echoed) must also fit
    `adapter` and the free-form JSON limits."""

    def check(value: Any) -> Any:
        _check_free_json(value)
        try:
            adapter.validate_python(value)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where + ': ' if where else ''}{err['msg']}") from None
        return value

    return AfterValidator(check)


class _Model(BaseModel):
    # Fields we do not use (voice, tools, ...) are accepted; types are strict (module docstring).
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# ---------------- tools (accepted and echoed, never called) ----------------


class _FunctionTool(_Model):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _McpFilter(_Model):
    read_only: bool | None = None
    tool_names: list[str] | None = None


class _McpApprovalFilter(_Model):
    always: _McpFilter | None = None
    never: _McpFilter | None = None


class _McpTool(_Model):
    type: Literal["mcp"]
    server_label: str = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS)
    server_url: str | None = None
    server_description: str | None = None
    connector_id: str | None = None
    tunnel_id: str | None = None
    authorization: str | None = None
    headers: dict[str, str] | None = None
    allowed_callers: list[Literal["direct", "programmatic"]] | None = None
    allowed_tools: list[str] | _McpFilter | None = None
    require_approval: Literal["always", "never"] | _McpApprovalFilter | None = None
    defer_loading: bool | None = None


def _tool_kind(v: Any) -> str:
    kind = v.get("type", "function") if isinstance(v, dict) else "function"
    return kind if isinstance(kind, str) else "?"


_TOOL: TypeAdapter[Any] = TypeAdapter(
    Annotated[
        Annotated[_FunctionTool, Tag("function")] | Annotated[_McpTool, Tag("mcp")],
        Discriminator(
            _tool_kind, custom_error_type="invalid_tool", custom_error_message="a tool's type is 'function' or 'mcp'"
        ),
    ]
)
Tool = Annotated[dict[str, Any], _shaped(_TOOL)]


class _ToolChoiceFunction(_Model):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS)


class _ToolChoiceMcp(_Model):
    type: Literal["mcp"]
    server_label: str = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS)
    name: str | None = Field(None, max_length=MAX_TOOL_NAME_CHARS)


_TOOL_CHOICE: TypeAdapter[Any] = TypeAdapter(
    Annotated[_ToolChoiceFunction | _ToolChoiceMcp, Field(discriminator="type")]
)


def _str_or_other(v: Any) -> str:
    return "string" if isinstance(v, str) else "other"


# A mode name or an object: one branch per JSON type, so an error names what that branch expected.
ToolChoice = Annotated[
    Annotated[Literal["auto", "none", "required"], Tag("string")]
    | Annotated[dict[str, Any], _shaped(_TOOL_CHOICE), Tag("other")],
    Discriminator(_str_or_other),
]
Tools = Annotated[list[Tool], Field(max_length=MAX_TOOLS)]
MaxOutputTokens = Annotated[
    Annotated[Literal["inf"], Tag("string")] | Annotated[Int, Field(ge=1, le=MAX_OUTPUT_TOKENS), Tag("other")],
    Discriminator(_str_or_other),
]


# ---------------- session.update ----------------


class AudioFormat(_Model):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    # audio/pcm: 24000 (16000 accepted); G.711: 8000
    rate: Annotated[Literal[8000, 16000, 24000], BeforeValidator(_integral)] | None = None

    @model_validator(mode="after")
    def _rate_fits_type(self) -> AudioFormat:
        if self.type == "audio/pcm" and self.rate == 8000:
            raise ValueError("audio/pcm takes rate 24000 or 16000; 8 kHz audio is audio/pcmu or audio/pcma")
        if self.type != "audio/pcm" and self.rate not in (None, 8000):
            raise ValueError(f"{self.type} is 8000 Hz")
        return self

    @property
    def sample_rate(self) -> int:
        return (self.rate or 24000) if self.type == "audio/pcm" else 8000


class ServerVadIn(_Model):
    type: Literal["server_vad"]
    threshold: float = Field(TurnDetection.threshold, gt=0.0, lt=1.0)
    prefix_padding_ms: Int = Field(TurnDetection.prefix_padding_ms, ge=PREFIX_PADDING_MS_RANGE[0],
                                   le=PREFIX_PADDING_MS_RANGE[1])  # fmt: skip
    silence_duration_ms: Int = Field(TurnDetection.silence_duration_ms, ge=SILENCE_DURATION_MS_RANGE[0],
                                     le=SILENCE_DURATION_MS_RANGE[1])  # fmt: skip
    idle_timeout_ms: Int | None = Field(None, ge=IDLE_TIMEOUT_MS_RANGE[0], le=IDLE_TIMEOUT_MS_RANGE[1])
    create_response: bool = True
    interrupt_response: bool = True


class SemanticVadIn(_Model):
    type: Literal["semantic_vad"]
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"
    create_response: bool = True
    interrupt_response: bool = True


TurnDetectionIn = Annotated[ServerVadIn | SemanticVadIn, Field(discriminator="type")]


class NoiseReduction(_Model):
    type: Literal["near_field", "far_field"]


class Transcription(_Model):
    model: str | None = Field(None, max_length=MAX_TRANSCRIPTION_MODEL_CHARS)
    language: str | None = Field(None, max_length=MAX_LANGUAGE_CHARS)
    prompt: str | None = Field(None, max_length=MAX_TRANSCRIPTION_PROMPT_CHARS)


class AudioInput(_Model):
    format: AudioFormat | None = None
    turn_detection: TurnDetectionIn | None = Field(default=None)
    transcription: Transcription | None = None
    noise_reduction: NoiseReduction | None = None


class AudioOutput(_Model):
    format: AudioFormat | None = None
    voice: str | None = Field(None, max_length=MAX_VOICE_CHARS)
    speed: float | None = Field(None, ge=0.25, le=1.5)


class SessionAudio(_Model):
    input: AudioInput | None = None
    output: AudioOutput | None = None


def _interrupt_phrase(phrase: str) -> str:
    if not re.search("[a-z0-9]", normalize(phrase)):
        raise ValueError(
            f"interrupt phrase {_printable(phrase, 40)!r} has no letter or digit: phrases are matched on their "
            "lowercase letters, digits and apostrophes"
        )
    return phrase


InterruptPhrase = Annotated[
    str, Field(min_length=1, max_length=MAX_INTERRUPT_PHRASE_CHARS), AfterValidator(_interrupt_phrase)
]


class OmnivoxOptions(_Model):
    interrupt_mode: Literal["command", "vad", "none"] | None = None
    interrupt_phrases: list[InterruptPhrase] | None = Field(None, max_length=MAX_INTERRUPT_PHRASES)
    binary_audio: bool | None = None
    max_audio_lead_ms: Int | None = Field(None, ge=100, le=60000)
    first_chunk_lookahead_frames: Int | None = Field(None, ge=0, le=3)  # opt-in fast start (README)


class SessionIn(_Model):
    type: Literal["realtime"] = "realtime"
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS_CHARS)
    output_modalities: list[Literal["audio", "text"]] | None = Field(None, min_length=1, max_length=1)
    audio: SessionAudio | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    max_output_tokens: MaxOutputTokens | None = None
    omnivox: OmnivoxOptions | None = None


class _Event(_Model):
    event_id: str | None = Field(None, max_length=MAX_EVENT_ID_CHARS)


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionIn


# ---------------- input audio buffer ----------------


class AudioAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str = Field(max_length=MAX_AUDIO_CHARS)


class AudioCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class AudioClear(_Event):
    type: Literal["input_audio_buffer.clear"]


# ---------------- conversation items ----------------


class ContentIn(_Model):
    type: Literal["input_text", "input_audio", "input_image", "output_text", "output_audio", "text"]
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    audio: str | None = Field(None, max_length=MAX_AUDIO_CHARS)
    transcript: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    image_url: str | None = Field(None, max_length=MAX_IMAGE_URL_CHARS)
    # accepted as OpenAI sends it; the release has one resolution (224 px)
    detail: Literal["auto", "low", "high"] | None = None


ROLE_CONTENT = {
    "user": ("input_text", "input_audio", "input_image"),
    "assistant": ("output_text", "output_audio", "text"),
    "system": ("input_text",),
}

ItemId = Annotated[str, Field(max_length=MAX_ID_CHARS)]


class ItemIn(_Model):
    id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system"] = "user"
    content: list[ContentIn] = Field(min_length=1, max_length=MAX_CONTENT_PARTS)

    @model_validator(mode="after")
    def _content_fits_role(self) -> ItemIn:
        allowed = ROLE_CONTENT[self.role]
        for part in self.content:
            if part.type not in allowed:
                raise ValueError(f"a {self.role} message takes content of type {', '.join(allowed)}, not {part.type}")
        return self


class ItemCreate(_Event):
    type: Literal["conversation.item.create"]
    item: ItemIn
    previous_item_id: ItemId | None = None


class ItemRetrieve(_Event):
    type: Literal["conversation.item.retrieve"]
    item_id: ItemId


class ItemDelete(_Event):
    type: Literal["conversation.item.delete"]
    item_id: ItemId


class ItemTruncate(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: ItemId
    content_index: Int = Field(0, ge=0, lt=MAX_CONTENT_PARTS)
    audio_end_ms: Int = Field(ge=0, le=MAX_MS)


# ---------------- responses ----------------


class ItemReference(_Model):
    type: Literal["item_reference"]
    id: ItemId


class InputMessage(ItemIn):
    type: Literal["message"]


ResponseInput = Annotated[InputMessage | ItemReference, Field(discriminator="type")]


class ResponseAudioOutput(_Model):
    format: AudioFormat | None = None
    voice: str | None = Field(None, max_length=MAX_VOICE_CHARS)


class ResponseAudio(_Model):
    output: ResponseAudioOutput | None = None


Metadata = dict[
    Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS)], Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)]
]


class ResponseIn(_Model):
    output_modalities: list[Literal["audio", "text"]] | None = Field(None, min_length=1, max_length=1)
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS_CHARS)
    metadata: Metadata | None = Field(None, max_length=MAX_METADATA_PAIRS)
    conversation: Literal["auto", "none"] | None = None
    input: list[ResponseInput] | None = Field(None, max_length=MAX_RESPONSE_INPUT_ITEMS)
    audio: ResponseAudio | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    max_output_tokens: MaxOutputTokens | None = None


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseIn | None = None


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: ItemId | None = None


class OutputAudioClear(_Event):
    """WebRTC only: cut off the answer's audio the server is playing out."""

    type: Literal["output_audio_buffer.clear"]


class Playback(_Event):
    type: Literal["omnivox.playback"]
    item_id: ItemId
    played_ms: Int = Field(ge=0, le=MAX_MS)


ClientEvent = Annotated[
    SessionUpdate
    | AudioAppend
    | AudioCommit
    | AudioClear
    | ItemCreate
    | ItemRetrieve
    | ItemDelete
    | ResponseCreate
    | ResponseCancel
    | ItemTruncate
    | OutputAudioClear
    | Playback,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
KNOWN_TYPES = {
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
    "conversation.item.truncate",
    "output_audio_buffer.clear",
    "omnivox.playback",
}


# ---------------- parsing ----------------


class _OutOfRange:
    """Stands in for a number outside the limits while the JSON is read (the path is found after)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _find(raw: Any, cls: type) -> list[str] | None:
    """The JSON path of the first `cls` instance in `raw` (iterative: `raw` may be deep)."""
    stack: list[tuple[Any, list[str]]] = [(raw, [])]
    while stack:
        v, path = stack.pop()
        if isinstance(v, cls):
            return path
        if isinstance(v, dict):
            stack.extend((x, [*path, _printable(str(k), 64)]) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((x, [*path, str(i)]) for i, x in reversed(list(enumerate(v))))
    return None


def _param(raw: Any, loc: tuple[int | str, ...], missing: bool) -> str | None:
    """pydantic's error location as a JSON path into what the client sent: the steps that are
    union members' tags ('server_vad', 'constrained-int', ...) are not in the JSON and go."""
    node, out = raw, []
    for i, p in enumerate(loc):
        if isinstance(node, dict) and isinstance(p, str) and p in node:
            node = node[p]
        elif isinstance(node, list) and isinstance(p, int) and 0 <= p < len(node):
            node = node[p]
        elif not (missing and i == len(loc) - 1):
            continue
        out.append(_printable(str(p), 64))
    return ".".join(out) or None


def parse_client_event(text: str | bytes) -> ClientEvent:
    out_of_range: list[str] = []

    def parse_int(s: str) -> int | _OutOfRange:
        if len(s) <= 15:  # |n| < 10**15 < 2**53: always in range, the common case
            return int(s)
        n = int(s) if len(s) <= 20 else None  # longer is out of range without converting it
        if n is None or abs(n) > MAX_JSON_INT:
            out_of_range.append(s)
            return _OutOfRange(s)
        return n

    def parse_float(s: str) -> float | _OutOfRange:
        x = float(s)
        if not math.isfinite(x):
            out_of_range.append(s)
            return _OutOfRange(s)
        return x

    if len(text) > BIG_FRAME_CHARS:
        if isinstance(text, str):
            values = text.count(",") + text.count("[") + text.count("{")
        else:
            values = text.count(b",") + text.count(b"[") + text.count(b"{")
        if values > MAX_BIG_FRAME_VALUES:
            raise ProtocolError(
                "invalid_event",
                f"a message over {BIG_FRAME_CHARS} characters may hold at most {MAX_BIG_FRAME_VALUES} JSON values "
                "(only audio and images make events this large)",
            )
    try:
        raw = json.loads(text, parse_constant=_no_constant, parse_int=parse_int, parse_float=parse_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError("invalid_json", f"the message is not valid JSON: {_printable(str(e), 200)}") from None
    except RecursionError:
        raise ProtocolError("invalid_json", "the message nests too deeply") from None
    except ValueError as e:  # NaN/Infinity
        raise ProtocolError("invalid_json", f"the message is not valid JSON: {_printable(str(e), 200)}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("invalid_json", "a client event must be a JSON object")
    eid = raw.get("event_id")
    # Echoed in the error only when it is one a valid event could carry.
    event_id = eid if isinstance(eid, str) and len(eid) <= MAX_EVENT_ID_CHARS and _unicode_ok(eid) else None
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_event", "the event has no string 'type'", "type", event_id)
    if kind not in KNOWN_TYPES:
        raise ProtocolError("unknown_event", f"unknown event type {_printable(kind)!r}", "type", event_id)
    if out_of_range:
        path = _find(raw, _OutOfRange)
        param = ".".join(path) if path else None
        raise ProtocolError(
            "invalid_event",
            f"{kind}: {param}: number out of range ({_printable(out_of_range[0], 24)}): integers must lie within "
            f"+-{MAX_JSON_INT} (2^53 - 1) and numbers must be finite",
            param,
            event_id,
        )
    try:
        return _ADAPTER.validate_python(raw)
    except RecursionError:
        raise ProtocolError("invalid_event", f"{kind}: the event nests too deeply", None, event_id) from None
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(raw, err["loc"][1:], err["type"] == "missing")  # loc[0]: the event type's tag
        message = f"{kind}: {param or 'event'}: {_printable(err['msg'], 300)}"
        raise ProtocolError("invalid_event", message, param, event_id) from None


def decode_audio(b64: str, event_id: str | None = None, even: bool = True) -> bytes:
    """base64 audio -> bytes; `even`: PCM16 needs whole samples (G.711 is one byte a sample)."""
    try:
        pcm = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_audio", "audio is not valid base64", "audio", event_id) from None
    if even and len(pcm) % 2:
        raise ProtocolError(
            "invalid_audio", f"PCM16 audio needs an even number of bytes, got {len(pcm)}", "audio", event_id
        )
    return pcm


IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/webp")


def decode_image_url(url: str | None, param: str, event_id: str | None = None) -> bytes:
    """`data:image/png;base64,...` (as the OpenAI Realtime API sends images) -> the file's bytes.
    Remote http(s) URLs are refused: the server fetches nothing on a client's behalf."""

    def bad(message: str) -> ProtocolError:
        return ProtocolError("invalid_image", message, param, event_id)

    if not url:
        raise bad("input_image needs an image_url (data:image/png;base64,...)")
    if not url.startswith("data:"):
        raise bad("image_url must be a data: URL (data:image/png;base64,...); remote URLs are not fetched")
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad("image_url must carry base64 data (data:<type>;base64,...)")
    mime = header[: -len(";base64")].lower()
    if mime not in IMAGE_MIME_TYPES:
        raise bad(f"unsupported image type {mime[:40]!r}: send {', '.join(IMAGE_MIME_TYPES)}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad("image_url is not valid base64") from None


def error_event(err: ProtocolError, event_id: str) -> dict[str, Any]:
    return {
        "type": "error",
        "event_id": event_id,
        "error": {
            "type": err.error_type,
            "code": err.code,
            "message": err.message,
            "param": err.param,
            "event_id": err.event_id,
        },
    }
