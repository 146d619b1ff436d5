"""Frozen configuration of a conversation session."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from model.decoding import SamplingConfig
from model.vision import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

INPUT_SAMPLE_RATES = (16000, 24000)
INPUT_FORMATS = ("audio/pcm", "audio/pcmu", "audio/pcma")  # PCM16 at 16/24 kHz; G.711 mu-law/A-law at 8 kHz
G711_RATE = 8000

# semantic_vad: how long an utterance the end-of-turn model calls incomplete may pause (OpenAI's limits).
EAGERNESS_MAX_WAIT_MS = {"low": 8000, "medium": 4000, "high": 2000, "auto": 4000}
# server_vad parameter ranges (inclusive), the one place they are written: the protocol's
# validation reads them too.
PREFIX_PADDING_MS_RANGE = (0, 5000)
SILENCE_DURATION_MS_RANGE = (32, 10000)
IDLE_TIMEOUT_MS_RANGE = (5000, 30000)


@dataclass(frozen=True)
class TurnDetection:
    """OpenAI Realtime `server_vad` / `semantic_vad` parameters.

    semantic_vad: once the VAD has heard `semantic_silence_ms` of silence, the end-of-turn
    model scores the turn so far; a complete utterance ends there, an incomplete one may
    pause up to the eagerness limit. The VAD threshold and padding stay at their defaults."""

    type: str = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    idle_timeout_ms: int | None = None  # server_vad: answer anyway after this long without speech
    create_response: bool = True
    interrupt_response: bool = True
    eagerness: str = "auto"
    semantic_silence_ms: int = 250
    semantic_threshold: float = 0.5  # p(complete) at or above this ends the turn

    @property
    def semantic(self) -> bool:
        return self.type == "semantic_vad"

    @property
    def max_wait_ms(self) -> int:
        return EAGERNESS_MAX_WAIT_MS[self.eagerness]

    def __post_init__(self) -> None:
        if self.type not in ("server_vad", "semantic_vad"):
            raise ValueError(f"turn detection type must be server_vad or semantic_vad, got {self.type!r}")
        if self.eagerness not in EAGERNESS_MAX_WAIT_MS:
            raise ValueError(f"eagerness must be one of {', '.join(EAGERNESS_MAX_WAIT_MS)}, got {self.eagerness!r}")
        if self.idle_timeout_ms is not None:
            _check_range("idle_timeout_ms", self.idle_timeout_ms, IDLE_TIMEOUT_MS_RANGE)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        _check_range("prefix_padding_ms", self.prefix_padding_ms, PREFIX_PADDING_MS_RANGE)
        _check_range("silence_duration_ms", self.silence_duration_ms, SILENCE_DURATION_MS_RANGE)


def _check_range(name: str, value: int, bounds: tuple[int, int]) -> None:
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name} must be in [{bounds[0]}, {bounds[1]}], got {value}")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


STAGES = ("llm", "encoder", "encoder_busy", "snac")


@dataclass(frozen=True)
class StageThreads:
    """torch intra-op threads per runner stage, each set on the stage's own thread (OpenMP's
    count is per thread). The decode step (llm) is the critical path of every playing answer
    and gets every core. The encoder gets every core when no answer is decoding (a lone
    turn's Whisper encode is most of its time to first audio) and `encoder_busy` while one is,
    so a new turn's encode does not starve answers that are playing (issue 14, item 6). SNAC
    windows are small: one thread. The VAD, the end-of-turn model and faster-whisper run one
    thread each (their own sessions' settings)."""

    llm: int
    encoder: int
    encoder_busy: int
    snac: int

    def __post_init__(self) -> None:
        for name in STAGES:
            if getattr(self, name) < 1:
                raise ValueError(f"stage threads must be >= 1, got {name}={getattr(self, name)}")

    @classmethod
    def for_cores(cls, cores: int | None = None) -> StageThreads:
        n = max(1, cores if cores is not None else available_cores())
        return cls(llm=n, encoder=n, encoder_busy=max(1, n // 2), snac=1)

    @classmethod
    def parse(cls, spec: str, cores: int | None = None) -> StageThreads:
        """ "llm=2,encoder=2,encoder_busy=1,snac=1"; stages not named keep for_cores' value."""
        base = cls.for_cores(cores)
        values: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep or name.strip() not in STAGES or not value.strip().isdigit():
                raise ValueError(f"stage threads: expected name=N with name in {', '.join(STAGES)}, got {part!r}")
            values[name.strip()] = int(value)
        return replace(base, **values)

    def as_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in STAGES}


class InterruptMode(str, Enum):
    COMMAND = "command"  # only a spoken command phrase interrupts (default)
    VAD = "vad"  # any speech longer than a minimum interrupts, as OpenAI's server_vad
    NONE = "none"  # nothing said interrupts; speech during an answer is ignored


DEFAULT_INTERRUPT_PHRASES = ("stop omni", "omni stop", "stop")


@dataclass(frozen=True)
class SessionConfig:
    input_format: str = "audio/pcm"
    input_sample_rate: int = 24000  # audio/pcm: 16000 or 24000; G.711 formats are 8000
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)  # None = push-to-talk
    output_modalities: tuple[str, ...] = ("audio",)
    interrupt_mode: InterruptMode = InterruptMode.COMMAND
    interrupt_phrases: tuple[str, ...] = DEFAULT_INTERRUPT_PHRASES
    vad_interrupt_min_ms: int = 250  # vad mode: speech this long interrupts
    # command/none modes: speech during an answer no longer than this that is not a command is a
    # backchannel ("yeah": 416 ms of speech), ignored; longer speech, or speech that goes on past
    # the answer's audio, becomes the next user turn (questions run 1 s and more).
    backchannel_max_ms: int = 700
    # Turn detection: once a silence in the user's speech has lasted this long, the answer's
    # encode and prefill start on the speech so far, and it steps the moment the turn really ends
    # there (if the speech goes on, that work is dropped). None: start only at the turn's end.
    # 160, not 0: gaps between words start encodes that cannot be stopped halfway, and the
    # real turn's encode queues behind them (full int8 on 2 cores: ttfa +1.2 s at 0, -0.9 s at 160).
    speculate_after_ms: int | None = 160
    chunk_frames: int = 1  # SNAC frames in the first audio chunk (1 frame = 85.33 ms): fast first audio
    # Later chunks double up to this. Each SNAC window also decodes 3 + 3 context frames: with 8
    # (14-frame windows) a frame costs 32 ms of one core on the full SNAC instead of 43 with 4
    # (README, Streaming engine).
    max_chunk_frames: int = 8
    left_context_frames: int = 3  # SNAC decode context; 3 + 3 decodes exactly
    lookahead_frames: int = 3
    # Opt-in fast start: the first chunk with this much lookahead (approximate at its end, ~85 ms
    # sooner per frame saved); None = exact from the first sample.
    first_chunk_lookahead_frames: int | None = None
    # Audio sent at most this far ahead of playback (frames in the SNAC stage come on top).
    max_audio_lead_ms: float = 1000.0
    transcribe_input: bool = False  # user-turn transcripts through the command detector's ASR
    max_new_tokens: int | None = None
    # False: answers run their whole token budget, past the model's end-of-audio and
    # end-of-text. For benchmarks only (not on the wire): random weights end answers within
    # ~20 steps, too soon to measure a barge-in on a slow host.
    stop_rules: bool = True
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_image_bytes: int = MAX_IMAGE_BYTES  # encoded size of a user image
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decoded width x height

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}")
        rates = INPUT_SAMPLE_RATES if self.input_format == "audio/pcm" else (G711_RATE,)
        if self.input_sample_rate not in rates:
            raise ValueError(f"{self.input_format} input takes a sample rate of {rates}, got {self.input_sample_rate}")
        if not set(self.output_modalities) <= {"audio", "text"} or not self.output_modalities:
            raise ValueError(f"output_modalities must be ['audio'] or ['text'], got {list(self.output_modalities)}")
        if (
            self.chunk_frames < 1
            or self.max_chunk_frames < 1
            or self.left_context_frames < 0
            or self.lookahead_frames < 0
        ):
            raise ValueError("chunk_frames must be >= 1 and the SNAC context sizes >= 0")
        if self.first_chunk_lookahead_frames is not None and not (
            0 <= self.first_chunk_lookahead_frames <= self.lookahead_frames
        ):
            raise ValueError(f"first_chunk_lookahead_frames must be in [0, {self.lookahead_frames}]")
        if self.speculate_after_ms is not None and self.speculate_after_ms < 0:
            raise ValueError("speculate_after_ms must be >= 0 or None")
        if self.backchannel_max_ms < 0:
            raise ValueError("backchannel_max_ms must be >= 0")
        if not all(p.strip() for p in self.interrupt_phrases):
            raise ValueError("interrupt phrases must be non-empty")

    @property
    def audio_out(self) -> bool:
        return "audio" in self.output_modalities

    def replace(self, **changes: Any) -> SessionConfig:
        return replace(self, **changes)
