"""Typed events a session emits; the server maps them onto the wire protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class SpeechStarted(Event):
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped(Event):
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class InputCommitted(Event):
    item_id: str
    duration_ms: int
    truncated: bool = False  # committed at the model's 30 s limit


@dataclass(frozen=True)
class InputCleared(Event):
    pass


@dataclass(frozen=True)
class InputTranscript(Event):
    item_id: str
    transcript: str
    audio_ms: int = 0  # length of the transcribed audio
    failed: bool = False  # the recognizer could not transcribe it (queue full, or it raised)


@dataclass(frozen=True)
class InputTimeout(Event):
    """idle_timeout_ms passed without speech: the silence became user item `item_id`."""

    item_id: str
    audio_start_ms: int
    audio_end_ms: int


@dataclass(frozen=True)
class ResponseCreated(Event):
    response_id: str
    item_id: str
    task: str
    audio_out: bool = True  # whether audio chunks will follow


@dataclass(frozen=True)
class TranscriptDelta(Event):
    response_id: str
    item_id: str
    delta: str


@dataclass(frozen=True)
class AudioChunk(Event):
    response_id: str
    item_id: str
    seq: int
    start_ms: float  # position of the chunk in the response's audio
    pcm: bytes  # 24 kHz mono PCM16 little-endian


@dataclass(frozen=True)
class ResponseDone(Event):
    response_id: str
    item_id: str
    status: str  # completed | cancelled | incomplete | failed
    reason: str | None = None  # turn_detected | client_cancelled (cancelled); max_output_tokens (incomplete)
    transcript: str = ""
    audio_ms: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Interrupted(Event):
    response_id: str
    phrase: str  # the command heard ("" in vad mode)
    detected_ms: int  # input timeline position of the detection


@dataclass(frozen=True)
class SessionError(Event):
    code: str
    message: str


def pcm16_ms(pcm: bytes, rate: int = 24000) -> float:
    """Duration of mono PCM16 audio (24 kHz: SNAC's rate, the output audio)."""
    return len(pcm) / 2 / rate * 1000


# ---------------- work a session asks its driver to do ----------------


@dataclass(frozen=True)
class Work:
    pass


@dataclass(frozen=True)
class StartResponse(Work):
    response_id: str
    item_id: str
    request: Any  # streaming.runner.ResponseRequest
    # Speculative: encode and prefill now (the user may have finished), step only once confirmed.
    speculative: bool = False


@dataclass(frozen=True)
class ConfirmResponse(Work):
    """The turn ended where the speculation assumed: the held response goes on. Carries the
    request, to start it afresh if the speculation never got a slot."""

    response_id: str
    item_id: str
    request: Any


@dataclass(frozen=True)
class CancelResponse(Work):
    response_id: str
    reason: str


@dataclass(frozen=True)
class PlaybackAt(Work):
    """Audio position 0 of the response played at `started_at` (the session's clock)."""

    response_id: str
    started_at: float


@dataclass(frozen=True)
class Transcribe(Work):
    """Run the speech recognizer; the text comes back through `Session.recognized(ticket, ...)`."""

    ticket: int
    audio: Any  # 16 kHz float32 numpy array
    prompt: str | None
    droppable: bool  # a partial command check, superseded by the next one
    command: bool  # a barge-in command check: the recognizer takes it before transcripts


@dataclass(frozen=True)
class ScoreTurn(Work):
    """Run the end-of-turn model; p(complete) comes back through `Session.turn_scored(ticket, ...)`."""

    ticket: int
    audio: Any
