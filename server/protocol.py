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

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


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
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[16000, 24000] = 24000


class TurnDetectionIn(_Model):
    type: Literal["server_vad"] = "server_vad"
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=5000)
    silence_duration_ms: int = Field(500, ge=32, le=10000)
    create_response: bool = True
    interrupt_response: bool = True


class AudioInput(_Model):
    format: AudioFormat | None = None
    turn_detection: TurnDetectionIn | None = Field(default=None)
    transcription: dict[str, Any] | None = None


class AudioOutput(_Model):
    format: AudioFormat | None = None


class SessionAudio(_Model):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class OmnivoxOptions(_Model):
    interrupt_mode: Literal["command", "vad", "none"] | None = None
    interrupt_phrases: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(None, max_length=32)
    binary_audio: bool | None = None
    max_audio_lead_ms: int | None = Field(None, ge=100, le=60000)


class SessionIn(_Model):
    type: Literal["realtime"] = "realtime"
    instructions: str | None = None
    output_modalities: list[Literal["audio", "text"]] | None = Field(None, min_length=1, max_length=1)
    audio: SessionAudio | None = None
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
    type: Literal["input_text", "input_audio", "input_image"]
    text: str | None = Field(None, max_length=20000)
    audio: str | None = None
    image_url: str | None = None
    detail: str | None = None  # accepted as OpenAI sends it; the release has one resolution (224 px)


class ItemIn(_Model):
    id: str | None = None
    type: Literal["message"] = "message"
    role: Literal["user", "system"] = "user"
    content: list[ContentIn] = Field(min_length=1)


class ItemCreate(_Event):
    type: Literal["conversation.item.create"]
    item: ItemIn
    previous_item_id: str | None = None


class ResponseIn(_Model):
    output_modalities: list[Literal["audio", "text"]] | None = Field(None, min_length=1, max_length=1)
    instructions: str | None = None


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseIn | None = None


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


class ItemTruncate(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: str
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
    "response.create",
    "response.cancel",
    "conversation.item.truncate",
    "omnivox.playback",
}


def parse_client_event(text: str | bytes) -> ClientEvent:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError("invalid_json", f"the message is not valid JSON: {e}") from None
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
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"] if str(p) != kind]
        param = ".".join(loc) or None
        raise ProtocolError("invalid_event", f"{kind}: {param or 'event'}: {err['msg']}", param, event_id) from None


def decode_audio(b64: str, event_id: str | None = None) -> bytes:
    try:
        pcm = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_audio", "audio is not valid base64", "audio", event_id) from None
    if len(pcm) % 2:
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
