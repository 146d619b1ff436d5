"""Client events of the OpenAI Realtime API (GA names) plus `omnivox.*`, as pydantic models.

Parsing never raises past `parse_client_event`: every failure becomes a `ProtocolError`
carrying the wire error code (shared/PROTOCOL.md, "Bad input"), the offending field and
the client's event_id.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None, event_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.event_id = event_id


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields we do not use (voice, tools, ...) are accepted


class AudioFormat(_Model):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: Literal[8000, 16000, 24000] | None = None  # audio/pcm: 24000 (16000 accepted); G.711: 8000

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
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=5000)
    silence_duration_ms: int = Field(500, ge=32, le=10000)
    idle_timeout_ms: int | None = Field(None, ge=5000, le=30000)
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
    model: str | None = Field(None, max_length=200)
    language: str | None = Field(None, max_length=20)
    prompt: str | None = Field(None, max_length=4000)


class AudioInput(_Model):
    format: AudioFormat | None = None
    turn_detection: TurnDetectionIn | None = Field(default=None)
    transcription: Transcription | None = None
    noise_reduction: NoiseReduction | None = None


class AudioOutput(_Model):
    format: AudioFormat | None = None
    voice: str | None = Field(None, max_length=100)
    speed: float | None = Field(None, ge=0.25, le=1.5)


class SessionAudio(_Model):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class OmnivoxOptions(_Model):
    interrupt_mode: Literal["command", "vad", "none"] | None = None
    interrupt_phrases: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(None, max_length=32)
    binary_audio: bool | None = None
    max_audio_lead_ms: int | None = Field(None, ge=100, le=60000)
    first_chunk_lookahead_frames: int | None = Field(None, ge=0, le=3)  # opt-in fast start (README)


MaxOutputTokens = Annotated[int, Field(ge=1, le=4096)] | Literal["inf"]
ToolChoice = Literal["auto", "none", "required"] | dict[str, Any]


class SessionIn(_Model):
    type: Literal["realtime"] = "realtime"
    instructions: str | None = Field(None, max_length=100_000)
    output_modalities: list[Literal["audio", "text"]] | None = Field(None, min_length=1, max_length=1)
    audio: SessionAudio | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    max_output_tokens: MaxOutputTokens | None = None
    omnivox: OmnivoxOptions | None = None


class _Event(_Model):
    event_id: str | None = Field(None, max_length=512)


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionIn


class AudioAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str


class AudioCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class AudioClear(_Event):
    type: Literal["input_audio_buffer.clear"]


class ContentIn(_Model):
    type: Literal["input_text", "input_audio", "input_image", "output_text", "output_audio", "text"]
    text: str | None = Field(None, max_length=20000)
    audio: str | None = None
    transcript: str | None = Field(None, max_length=20000)
    image_url: str | None = None
    detail: str | None = None  # accepted as OpenAI sends it; the release has one resolution (224 px)


ROLE_CONTENT = {
    "user": ("input_text", "input_audio", "input_image"),
    "assistant": ("output_text", "output_audio", "text"),
    "system": ("input_text",),
}


class ItemIn(_Model):
    id: str | None = Field(None, min_length=1, max_length=64)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system"] = "user"
    content: list[ContentIn] = Field(min_length=1, max_length=16)

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
    previous_item_id: str | None = Field(None, max_length=64)


class ItemRetrieve(_Event):
    type: Literal["conversation.item.retrieve"]
    item_id: str = Field(max_length=64)


class ItemDelete(_Event):
    type: Literal["conversation.item.delete"]
    item_id: str = Field(max_length=64)


class ItemReference(_Model):
    type: Literal["item_reference"]
    id: str = Field(max_length=64)


class InputMessage(ItemIn):
    type: Literal["message"]


ResponseInput = Annotated[InputMessage | ItemReference, Field(discriminator="type")]


class ResponseAudioOutput(_Model):
    format: AudioFormat | None = None
    voice: str | None = Field(None, max_length=100)


class ResponseAudio(_Model):
    output: ResponseAudioOutput | None = None


class ResponseIn(_Model):
    output_modalities: list[Literal["audio", "text"]] | None = Field(None, min_length=1, max_length=1)
    instructions: str | None = Field(None, max_length=100_000)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16
    )
    conversation: Literal["auto", "none"] | None = None
    input: list[ResponseInput] | None = Field(None, max_length=64)
    audio: ResponseAudio | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    max_output_tokens: MaxOutputTokens | None = None


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseIn | None = None


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


class ItemTruncate(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: str = Field(max_length=64)
    content_index: int = Field(0, ge=0)
    audio_end_ms: int = Field(ge=0)


class Playback(_Event):
    type: Literal["omnivox.playback"]
    item_id: str
    played_ms: int = Field(ge=0)


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
    "omnivox.playback",
}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_client_event(text: str | bytes) -> ClientEvent:
    try:
        raw = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError("invalid_json", f"the message is not valid JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("invalid_json", "the message nests too deeply") from None
    except ValueError as e:  # NaN/Infinity, or an integer past Python's digit limit
        raise ProtocolError("invalid_json", f"the message is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("invalid_json", "a client event must be a JSON object")
    event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_event", "the event has no string 'type'", "type", event_id)
    if kind not in KNOWN_TYPES:
        raise ProtocolError("unknown_event", f"unknown event type {kind[:80]!r}", "type", event_id)
    try:
        return _ADAPTER.validate_python(raw)
    except RecursionError:
        raise ProtocolError("invalid_event", f"{kind}: the event nests too deeply", None, event_id) from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"] if str(p) != kind]
        param = ".".join(loc) or None
        raise ProtocolError("invalid_event", f"{kind}: {param or 'event'}: {err['msg']}", param, event_id) from None


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
            "type": "invalid_request_error",
            "code": err.code,
            "message": err.message,
            "param": err.param,
            "event_id": err.event_id,
        },
    }
