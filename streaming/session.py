"""One conversation as a state machine: input audio -> turn taking -> responses -> events, with barge-in.

Sans-I/O: no threads, locks, callbacks, clocks or blocking calls. Inputs are method calls
(audio already decoded with its VAD probabilities, client requests, the runner's events, the
recognizer's and the end-of-turn model's answers, the time); outputs are the events for the
client (`take_events`) and the work for the driver (`take_work`: start or cancel a response on
the runner, tell it where playback stands, transcribe, score a turn). Every time is the caller's
`now` (seconds, one monotonic clock), so a fake clock makes it deterministic.

The answers of slow work carry the ticket they were asked with; an answer about speech or a
response that is no longer current is dropped. Events of a response that is not current, or
that was cancelled, are never forwarded: late frames of an old answer are dropped, never sent.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from model.audio import MAX_INPUT_SECONDS
from model.prompts import Task
from model.vision import NO_IMAGES

from .audio_in import MODEL_RATE, AudioHistory
from .config import InterruptMode, SessionConfig
from .detector import bias_prompt, match_phrase
from .events import (
    AudioChunk,
    CancelResponse,
    ConfirmResponse,
    Event,
    InputCleared,
    InputCommitted,
    InputTimeout,
    InputTranscript,
    Interrupted,
    PlaybackAt,
    ResponseCreated,
    ResponseDone,
    ScoreTurn,
    SessionError,
    SpeechStarted,
    SpeechStopped,
    StartResponse,
    Transcribe,
    TranscriptDelta,
    Work,
    pcm16_ms,
)
from .runner import SERVER_ERROR_MESSAGE, ResponseRequest
from .vad import WINDOW, TurnDetector, VadEdge

log = logging.getLogger(__name__)

MAX_TURN_SAMPLES = int(MAX_INPUT_SECONDS * MODEL_RATE)
COMMAND_CHECK_EVERY = int(0.32 * MODEL_RATE)  # re-check a growing command segment this often
MAX_REMEMBERED_INPUTS = 8  # user items a response may still answer (audio up to 30 s each)
MAX_OPEN_TICKETS = 64  # answers still awaited; older ones are forgotten (their answer is dropped)


ACTIVE_RESPONSE = "conversation_already_has_active_response"  # OpenAI's code and wording


def active_response_message(response_id: str) -> str:
    return (
        f"Conversation already has an active response in progress: {response_id}. "
        "Wait until the response is finished before creating a new one."
    )


def ms(samples: int) -> int:
    return int(samples * 1000 // MODEL_RATE)


@dataclass
class _Barge:
    """Speech heard while the assistant speaks."""

    start: int  # absolute 16 kHz sample of the speech start
    segment: int  # id, to ignore late recognizer answers
    checked_until: int = 0
    partial_out: bool = False  # a partial check is with the recognizer: the next waits for its verdict
    pause_ticket: int | None = None  # the check at the last pause
    matched: str | None = None
    announced: str | None = None  # the item of the speech_started its interrupt sent: stopped at its end


@dataclass
class _Held:
    """Speech heard during an answer, longer than a backchannel and not a command: the next
    user turn, committed once the answer's audio is over."""

    item_id: str
    start: int  # absolute 16 kHz sample of its first speech
    end: int
    audio: np.ndarray  # kept here: a long answer outlasts the audio history
    segment: int  # the barge-in segment whose final command verdict it waits for
    ready: bool = False  # that verdict came back: not a command


@dataclass
class LiveResponse:
    """The current response, as the client has received it."""

    response_id: str
    item_id: str
    task: Task
    audio_out: bool
    cancelled: str | None = None  # the reason, once cancelled: only its ResponseDone is forwarded
    first_audio_at: float | None = None
    audio_ms: float = 0.0  # forwarded audio
    text: str = ""  # forwarded transcript


@dataclass(frozen=True)
class _TurnAsk:
    pause: int


@dataclass(frozen=True)
class _TranscriptAsk:
    item_id: str
    audio_ms: int


CheckKind = Literal["partial", "pause", "final"]


@dataclass(frozen=True)
class _CommandAsk:
    segment: int
    response_id: str  # the answer playing when the speech was heard: the only one the verdict may cancel
    end: int
    phrases: tuple[str, ...]
    # "partial": of the speech so far, while it goes on; "pause": at its first short silence
    # (the final one if the silence lasts); "final": of the whole utterance, once it ended
    kind: CheckKind

    @property
    def final(self) -> bool:
        return self.kind == "final"


@dataclass(frozen=True)
class _Create:
    item_id: str
    output_modalities: tuple[str, ...] | None
    max_new_tokens: int | None
    response_id: str


@dataclass(frozen=True)
class _Speculation:
    """An answer begun at a pause of the open turn (encode + prefill, held by the runner)."""

    create: _Create
    start: int  # the turn's audio: it must be committed exactly as [start, end)
    end: int  # the sample the pause began at
    assistant_item: str
    request: ResponseRequest


class Session:
    def __init__(
        self,
        config: SessionConfig | None = None,
        *,
        takes_images: bool = False,
        recognizer: bool = False,
        turn_model: bool = False,
    ) -> None:
        """`recognizer` / `turn_model`: whether the driver can run Transcribe / ScoreTurn work."""
        self.config = config or SessionConfig()
        self.takes_images = takes_images
        self.has_recognizer = recognizer
        self.has_turn_model = turn_model
        self._events: list[Event] = []
        self._work: list[Work] = []
        self._tag = secrets.token_hex(3)  # ids unique across sessions (the runner, logs)
        self._ids = itertools.count(1)
        self._segments = itertools.count(1)
        self._tickets = itertools.count(1)
        self._asks: OrderedDict[int, _TurnAsk | _TranscriptAsk | _CommandAsk] = OrderedDict()
        self._history = AudioHistory(MAX_TURN_SAMPLES + 10 * MODEL_RATE)
        self._spec: _Speculation | None = None
        self._reset_input()
        self.response: LiveResponse | None = None
        self._queued: _Create | None = None  # created while the current one was being cancelled
        self._playback_until = 0.0  # time the sent audio finishes playing
        self._speech_end_at: float | None = None  # time the user's turn ended, for ttfa
        self._ttfa_ms: float | None = None
        self._barge: _Barge | None = None
        self._interrupted_segment = 0  # the barge-in segment that already interrupted (one per utterance)
        self._held: _Held | None = None  # a question asked during the answer, for after it
        self._inputs: OrderedDict[str, tuple[np.ndarray | None, str | None]] = OrderedDict()  # what responses answer
        self._idle_from: float | None = None  # idle_timeout_ms counts from this time
        self._pending_image: torch.Tensor | None = None  # CLIP pixels for the next audio turn
        self._last_response_id = ""

    # ---------------- outputs ----------------

    def take_events(self) -> list[Event]:
        """Events for the client since the last call, in order."""
        out, self._events = self._events, []
        return out

    def take_work(self) -> list[Work]:
        """Work for the driver since the last call, in order."""
        out, self._work = self._work, []
        return out

    def next_deadline(self) -> float | None:
        """The time `tick` has something to do (a held turn's release, the idle timeout), if any."""
        deadlines = []
        if self._held is not None and self._held.ready and self.response is None:
            deadlines.append(self._playback_until)
        idle = self._idle_deadline()
        if idle is not None:
            deadlines.append(idle)
        return min(deadlines, default=None)

    def _idle_deadline(self) -> float | None:
        td = self.config.turn_detection
        if td is None or td.idle_timeout_ms is None or self._idle_from is None:
            return None
        return self._idle_from + td.idle_timeout_ms / 1000

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _ask(self, ask: _TurnAsk | _TranscriptAsk | _CommandAsk) -> int:
        ticket = next(self._tickets)
        self._asks[ticket] = ask
        while len(self._asks) > MAX_OPEN_TICKETS:
            self._asks.popitem(last=False)
        return ticket

    # ---------------- configuration ----------------

    def _reset_input(self) -> None:
        td = self.config.turn_detection
        pause = self.config.speculate_after_ms
        self._turns = TurnDetector(td, has_scorer=self.has_turn_model, pause_ms=pause) if td else None
        self._vad_pos = self._history.end  # absolute sample of the next VAD window
        self._turn_start: int | None = None  # absolute sample where the open user turn begins
        self._turn_item: str | None = None
        self._turn_segment: int | None = None  # the open turn began as speech during an answer
        self._held = None
        self._buffer_start = self._history.end  # push-to-talk: audio since the last commit/clear

    def update(self, config: SessionConfig) -> bool:
        """A new configuration; True when the input pipeline (format, rate, VAD) starts afresh,
        i.e. the driver must give it audio decoded with a new front end."""
        restart = (config.input_sample_rate, config.input_format, config.turn_detection) != (
            self.config.input_sample_rate,
            self.config.input_format,
            self.config.turn_detection,
        )
        self.config = config
        self._drop_speculation()  # built with the old configuration
        if restart:
            self._reset_input()  # the input timeline stays monotonic: it goes on from here
        return restart

    # ---------------- input audio ----------------

    def error(self, code: str, message: str) -> None:
        """An input the driver could not use (e.g. undecodable audio)."""
        self._emit(SessionError(code, message))

    def receive_audio(self, audio16: np.ndarray, probs: list[float], now: float) -> None:
        """16 kHz audio, and the VAD's speech probability of each 512-sample window it completes
        (windows follow each other from the start of the input, or of the last restart)."""
        self._history.append(audio16)
        for prob in probs:
            start = self._vad_pos
            self._vad_pos += WINDOW
            self._on_window(prob, start, now)
        self._check_turn_limit(now)
        self._release_held(now)

    def _on_window(self, prob: float, start: int, now: float) -> None:
        if self._turns is None:
            return
        edge = self._turns.update(prob, start)
        if edge is not None and edge.kind == "score":
            self._score(edge)
            return
        if self._barge is not None:
            self._on_barge_window(edge, start + WINDOW, now)
            return
        self._on_edge(edge, now)

    def _on_edge(self, edge: VadEdge | None, now: float) -> None:
        if edge is None:
            return
        assert self._turns is not None
        if edge.kind == "pause":
            self._speculate(edge.sample)
        elif edge.kind == "resume":
            self._drop_speculation()
        elif edge.kind == "start":
            self._idle_from = None
            if self.speaking_at(now) and self._barge_applies():
                self._start_barge(edge.sample)
                return
            self._open_turn(edge.sample)
            held, self._held = self._held, None
            if held is not None and self._turn_start is not None:  # the question goes on: one turn from its start
                self._turn_start = max(self._history.start, min(self._turn_start, held.end - held.audio.size))
        elif edge.kind == "stop" and self._turn_start is not None:
            self._emit(SpeechStopped(self._turn_item or "", ms(edge.sample)))
            self._commit_turn(self._turn_start, edge.sample, now, respond=self._turns.cfg.create_response)

    def _score(self, edge: VadEdge) -> None:
        """semantic_vad: the end-of-turn model's p(complete) of the open turn up to the edge."""
        if self._turn_start is None:
            return
        audio = self._history.slice(self._turn_start, edge.sample)
        self._work.append(ScoreTurn(self._ask(_TurnAsk(edge.pause)), audio))

    def turn_scored(self, ticket: int, p: float | None, now: float) -> None:
        """The end-of-turn model's answer (None: it could not score)."""
        ask = self._asks.pop(ticket, None)
        if not isinstance(ask, _TurnAsk) or self._turns is None:
            return
        edge = self._turns.scored(ask.pause, p)
        if self._barge is not None:
            self._on_barge_window(edge, self._vad_pos, now)
        else:
            self._on_edge(edge, now)

    def _barge_applies(self) -> bool:
        td = self.config.turn_detection
        return td is not None and td.interrupt_response

    def _open_turn(self, speech_start: int, segment: int | None = None) -> None:
        assert self.config.turn_detection is not None
        self._turn_item = self._new_id("item")
        self._turn_segment = segment
        self._turn_start = max(self._history.start, speech_start - self.config.turn_detection.prefix_padding_ms * 16)
        self._emit(SpeechStarted(self._turn_item, ms(speech_start)))

    def _check_turn_limit(self, now: float) -> None:
        start = self._turn_start if self._turns is not None else self._buffer_start
        if start is None or self._history.end - start < MAX_TURN_SAMPLES:
            return
        cut = start + MAX_TURN_SAMPLES
        self._emit(SessionError("input_too_long", "the turn reached the model's 30 s window: committed at the limit"))
        if self._turns is not None:
            self._commit_turn(start, cut, now, truncated=True, respond=self._turns.cfg.create_response)
            # The speech goes on: what follows is a new turn.
            self._turn_item = self._new_id("item")
            self._turn_start = cut
            self._emit(SpeechStarted(self._turn_item, ms(cut)))
        else:
            self._commit_audio(self._new_id("item"), self._history.slice(start, cut), now, truncated=True)
            self._buffer_start = cut

    def _commit_turn(self, start: int, end: int, now: float, respond: bool, truncated: bool = False) -> None:
        item = self._turn_item or self._new_id("item")
        self._turn_start = None
        self._turn_item = None
        self._turn_segment = None
        spec = self._spec
        if not (respond and spec is not None and spec.create.item_id == item and spec.start == start
                and spec.end == end):  # fmt: skip
            spec = None
            self._drop_speculation()
        self._commit_audio(item, self._history.slice(start, end), now, truncated, respond,
                           spec.create if spec else None)  # fmt: skip

    def _commit_audio(
        self,
        item: str,
        audio: np.ndarray,
        now: float,
        truncated: bool = False,
        respond: bool = False,
        create: _Create | None = None,
    ) -> None:
        """A user audio item; answered at once only when turn detection ended it with create_response
        (as OpenAI: a client's commit, or create_response false, waits for response.create)."""
        self._emit(InputCommitted(item, ms(audio.size), truncated))
        self._speech_end_at = now
        self._remember(item, audio, None)
        if self.config.transcribe_input and self.has_recognizer:
            ticket = self._ask(_TranscriptAsk(item, ms(audio.size)))
            self._work.append(Transcribe(ticket, audio, None, droppable=False, command=False))
        if respond:
            self._request_response(create or _Create(item, None, None, self._new_id("resp")), now)

    def _remember(self, item: str, audio: np.ndarray | None, text: str | None) -> None:
        self._inputs[item] = (audio, text)
        self._inputs.move_to_end(item)
        while len(self._inputs) > MAX_REMEMBERED_INPUTS:
            self._inputs.popitem(last=False)

    def forget(self, item: str) -> None:
        """A user item was deleted from the conversation: it is answered no more."""
        self._inputs.pop(item, None)

    def has_input(self, item: str) -> bool:
        return item in self._inputs

    def commit(self, now: float) -> None:
        """End the user turn now (push-to-talk, or forcing the end with server VAD)."""
        start = self._turn_start if self._turns is not None else self._buffer_start
        end = self._history.end
        if start is None or end - start <= 0:
            self._emit(SessionError("input_audio_buffer_commit_empty", "there is no uncommitted audio to commit"))
            return
        if self._turns is not None:
            self._turns.reset()
            self._commit_turn(start, end, now, respond=False)
        else:
            self._buffer_start = end
            self._commit_audio(self._new_id("item"), self._history.slice(start, end), now)

    def clear(self) -> None:
        self._buffer_start = self._history.end
        self._turn_start = None
        self._turn_item = None
        self._turn_segment = None
        self._held = None
        self._drop_speculation()
        if self._turns is not None:
            self._turns.reset()
        self._emit(InputCleared())

    def add_audio(self, audio16: np.ndarray, item_id: str | None = None) -> str | None:
        """A whole user audio message (16 kHz), outside the VAD stream."""
        if audio16.size == 0:
            self._emit(SessionError("invalid_audio", "the audio message is empty"))
            return None
        if audio16.size > MAX_TURN_SAMPLES:
            self._emit(SessionError("input_too_long", "audio message longer than 30 s: cut at the limit"))
            audio16 = audio16[:MAX_TURN_SAMPLES]
        item = item_id or self._new_id("item")
        self._remember(item, audio16, None)
        return item

    def report_playback(self, played_ms: float, now: float) -> None:
        """The client's real playback position in the current answer (pacing and barge-in window)."""
        r = self.response
        if r is not None and r.first_audio_at is not None:
            r.first_audio_at = now - played_ms / 1000
            self._work.append(PlaybackAt(r.response_id, r.first_audio_at))
        audio_ms = r.audio_ms if r is not None else 0.0
        self._playback_until = now + max(0.0, audio_ms - played_ms) / 1000

    def speaking_at(self, now: float) -> bool:
        """Generating (and not cancelled), or the audio already sent has not finished playing."""
        r = self.response
        return (r is not None and r.cancelled is None) or now < self._playback_until

    def tick(self, now: float) -> None:
        """server_vad idle_timeout_ms: no speech for that long after the last answer finished
        playing -> the silence is committed as a user turn and answered (as OpenAI does).
        A question asked during the answer is committed once the answer's audio is over."""
        self._release_held(now)
        deadline = self._idle_deadline()
        if deadline is None or now < deadline:
            return
        if self.response is not None or self._turn_start is not None or self._barge is not None:
            return
        td = self.config.turn_detection
        assert td is not None and td.idle_timeout_ms is not None
        self._idle_from = None
        end = self._history.end
        start = max(self._history.start, self._buffer_start, end - td.idle_timeout_ms * MODEL_RATE // 1000)
        item = self._new_id("item")
        self._emit(InputTimeout(item, ms(start), ms(end)))
        self._commit_audio(item, self._history.slice(start, end), now, respond=td.create_response)

    # ---------------- text turns, images and responses ----------------

    def add_image(self, pixels: torch.Tensor, item_id: str | None = None) -> str | None:
        """A user image as CLIP pixels (model.vision.image_pixels / preprocess): the next audio
        turn is answered about it (Mini-Omni2's image task; one image per turn, a newer image
        replaces a pending one)."""
        if not self.takes_images:
            self._emit(SessionError("image_not_supported", NO_IMAGES))
            return None
        self._pending_image = pixels
        return item_id or self._new_id("item")

    @property
    def image_pending(self) -> bool:
        return self._pending_image is not None

    def add_text(self, text: str, now: float, create_response: bool = False, item_id: str | None = None) -> str:
        item = item_id or self._new_id("item")
        self._remember(item, None, text)
        if create_response:
            self._request_response(_Create(item, None, None, self._new_id("resp")), now)
        return item

    def create_response(
        self,
        now: float,
        output_modalities: tuple[str, ...] | None = None,
        item_id: str | None = None,
        max_new_tokens: int | None = None,
    ) -> str | None:
        """Answer a user item (by default the latest: a committed turn or a message). Returns the
        response id (its ResponseCreated follows the end of a response still being cancelled)."""
        if item_id is None and self._inputs:
            item_id = next(reversed(self._inputs))
        if item_id is None or item_id not in self._inputs:
            self._emit(SessionError("invalid_request", "there is no user input to respond to"))
            return None
        return self._request_response(_Create(item_id, output_modalities, max_new_tokens, self._new_id("resp")), now)

    def _request_response(self, create: _Create, now: float) -> str | None:
        r = self.response
        if r is not None and (r.cancelled is None or self._queued is not None):
            self._emit(SessionError(ACTIVE_RESPONSE, active_response_message(r.response_id)))
            if self._spec is not None and self._spec.create.response_id == create.response_id:
                self._drop_speculation()
            return None
        if r is not None:  # being cancelled: starts once its end has come
            self._queued = create
            return create.response_id
        self._start_response(create, now)
        return create.response_id

    def _start_response(self, create: _Create, now: float) -> None:
        if create.item_id not in self._inputs:
            self._emit(SessionError("invalid_request", "the user input to respond to was deleted"))
            return
        spec = self._spec
        work: StartResponse | ConfirmResponse
        if spec is not None and spec.create.response_id == create.response_id:
            # The turn ended where the speculation assumed: its encode and prefill are (being) done.
            self._spec = None
            item, request = spec.assistant_item, spec.request
            work = ConfirmResponse(create.response_id, item, request)
        else:
            self._drop_speculation()
            audio, text = self._inputs[create.item_id]
            image = None
            if audio is not None and self._pending_image is not None:
                image, self._pending_image = self._pending_image, None
            item, request = self._new_id("item"), self._plan(create, audio, text, image)
            work = StartResponse(create.response_id, item, request)
        r = LiveResponse(create.response_id, item, request.task, audio_out=request.makes_audio)
        self.response = r
        self._last_response_id = r.response_id
        self._ttfa_ms = None
        self._idle_from = None
        self._work.append(work)
        self._emit(ResponseCreated(r.response_id, r.item_id, r.task.value, audio_out=r.audio_out))

    def _plan(
        self, create: _Create, audio: np.ndarray | None, text: str | None, image: torch.Tensor | None
    ) -> ResponseRequest:
        """The runner's request for answering an input."""
        modalities = create.output_modalities or self.config.output_modalities
        audio_out = "audio" in modalities
        if image is not None:
            task = Task.IMAGE_A1A2  # the release's image task always speaks; text-only output drops its audio
        elif audio is not None:
            task = Task.A1A2 if audio_out else Task.A1T2
        else:
            task = Task.T1A2 if audio_out else Task.T1T2
        cfg = self.config
        return ResponseRequest(
            task=task,
            audio=audio,
            text=text,
            image=image,
            audio_output=audio_out,
            sampling=cfg.sampling,
            max_new_tokens=create.max_new_tokens if create.max_new_tokens is not None else cfg.max_new_tokens,
            chunk_frames=cfg.chunk_frames,
            max_chunk_frames=cfg.max_chunk_frames,
            left_context_frames=cfg.left_context_frames,
            lookahead_frames=cfg.lookahead_frames,
            first_lookahead_frames=cfg.first_chunk_lookahead_frames,
            max_audio_lead_ms=cfg.max_audio_lead_ms,
            stop_rules=cfg.stop_rules,
        )

    # ---------------- speculation ----------------

    def _speculate(self, pause_at: int) -> None:
        """A pause in the open turn: if the turn ends there and is answered at once, its answer
        may start now. The runner encodes and prefills it and holds it until confirmed."""
        td = self.config.turn_detection
        if td is None or not td.create_response or self._turn_start is None or self._turn_item is None:
            return
        if self.response is not None or self._queued is not None or self._pending_image is not None:
            return  # the turn's answer could not start at its end: nothing to gain
        self._drop_speculation()
        create = _Create(self._turn_item, None, None, self._new_id("resp"))
        request = self._plan(create, self._history.slice(self._turn_start, pause_at), None, None)
        spec = _Speculation(create, self._turn_start, pause_at, self._new_id("item"), request)
        self._spec = spec
        self._work.append(StartResponse(create.response_id, spec.assistant_item, request, speculative=True))

    def _drop_speculation(self) -> None:
        spec = self._spec
        if spec is not None:
            self._spec = None
            self._work.append(CancelResponse(spec.create.response_id, "speculation_dropped"))

    def response_refused(self, response_id: str, message: str, now: float) -> None:
        """The runner had no room for a response just started: it ends at once, failed."""
        r = self.response
        if r is None or r.response_id != response_id:
            return
        self._emit(SessionError("rate_limited", message))
        self._end(ResponseDone(response_id, r.item_id, "failed", message), now)

    def response_event(self, event: Event, now: float) -> None:
        """An event of a response from the runner (in the order the runner made them)."""
        r = self.response
        if r is None or getattr(event, "response_id", None) != r.response_id:
            return  # a response that is not current any more: nothing of it is forwarded
        if isinstance(event, ResponseDone):
            self._end(event, now)
        elif r.cancelled is not None:
            return
        elif isinstance(event, AudioChunk):
            if r.first_audio_at is None:
                r.first_audio_at = now
                self._playback_until = now
                self._work.append(PlaybackAt(r.response_id, now))
                if self._speech_end_at is not None:
                    self._ttfa_ms = (now - self._speech_end_at) * 1000
            duration = pcm16_ms(event.pcm)
            self._playback_until = max(self._playback_until, now) + duration / 1000
            r.audio_ms += duration
            self._emit(event)
        elif isinstance(event, TranscriptDelta):
            r.text += event.delta
            self._emit(event)

    def _end(self, done: ResponseDone, now: float) -> None:
        r = self.response
        assert r is not None
        timings = dict(done.timings)
        timings["ttfa_ms"] = round(self._ttfa_ms, 2) if self._ttfa_ms is not None else None
        status, reason = done.status, done.reason
        if r.cancelled is not None and status == "completed":
            status, reason = "cancelled", r.cancelled  # it ended before the cancel reached the runner
        if status == "failed" and reason == SERVER_ERROR_MESSAGE:
            self._emit(SessionError("server_error", SERVER_ERROR_MESSAGE))
        # What the client got: the forwarded transcript and audio (a cancel drops the rest).
        self._emit(replace(done, status=status, reason=reason, transcript=r.text, audio_ms=r.audio_ms,
                           timings=timings))  # fmt: skip
        self.response = None
        if r.cancelled is None:
            self._idle_from = max(now, self._playback_until)
        queued, self._queued = self._queued, None
        if queued is not None:
            self._start_response(queued, now)

    def cancel_response(self, reason: str = "client_cancelled") -> bool:
        """Stop the current response: nothing more of it is forwarded; its ResponseDone
        (status cancelled) follows from the runner within one step."""
        r = self.response
        if r is None or r.cancelled is not None:
            return False
        r.cancelled = reason
        self._playback_until = 0.0
        self._work.append(CancelResponse(r.response_id, reason))
        return True

    @property
    def responding(self) -> str | None:
        """The id of the response a client may cancel: current and not cancelled."""
        r = self.response
        return r.response_id if r is not None and r.cancelled is None else None

    # ---------------- barge-in ----------------

    def _start_barge(self, speech_start: int) -> None:
        self._barge = _Barge(start=speech_start, segment=next(self._segments), checked_until=speech_start)
        if self.config.interrupt_mode is InterruptMode.COMMAND:
            self._check_command("partial", end=self._history.end)

    def _on_barge_window(self, edge: VadEdge | None, window_end: int, now: float) -> None:
        b = self._barge
        assert b is not None
        mode = self.config.interrupt_mode
        keeps_speech = mode is not InterruptMode.VAD and b.matched is None  # what does not interrupt is kept
        if keeps_speech and not self.speaking_at(now):
            # The answer's audio is over and the speech goes on: the next user turn, from its start.
            self._barge = None
            self._open_turn(b.start, segment=b.segment)
            self._on_edge(edge, now)
            return
        if edge is not None and edge.kind == "stop":
            if b.announced is not None:
                self._emit(SpeechStopped(b.announced, ms(edge.sample)))
            if mode is InterruptMode.COMMAND and b.matched is None and not self._pause_check_is_final(b, edge.sample):
                self._check_command("final", end=edge.sample)
            if keeps_speech and ms(edge.sample - b.start) > self.config.backchannel_max_ms:
                self._hold(b, edge.sample)
            self._barge = None
            return
        if mode is InterruptMode.VAD:
            if ms(window_end - b.start) >= self.config.vad_interrupt_min_ms:
                # As OpenAI's server_vad: the speech that interrupts is the next user turn, and
                # its speech_started is the one that tells the client to stop playback.
                self._barge = None
                self._open_turn(b.start)
                self._interrupt("", b.start, announce=False)
        elif mode is InterruptMode.COMMAND and edge is not None and edge.kind == "pause":
            # A short silence (speculate_after_ms): the command is likely whole, and the check
            # goes now rather than when the silence has lasted the turn's silence_duration_ms.
            self._check_command("pause", end=edge.sample)
        elif mode is InterruptMode.COMMAND and window_end - b.checked_until >= COMMAND_CHECK_EVERY:
            self._check_command("partial", end=window_end)

    def _pause_check_is_final(self, b: _Barge, end: int) -> bool:
        """The speech ended where it paused: the pause's check, still out, is the final one
        (the same audio). True when it was made so."""
        ticket = b.pause_ticket
        if ticket is None:
            return False
        ask = self._asks.get(ticket)  # gone: its verdict came (no command), the final one is asked anew
        if not isinstance(ask, _CommandAsk) or ask.end != end:
            return False
        self._asks[ticket] = replace(ask, kind="final")
        return True

    def _hold(self, b: _Barge, end: int) -> None:
        """Keep speech that did not interrupt for after the answer (an earlier held utterance
        of this answer and this one make one turn, from the earlier one's start)."""
        assert self.config.turn_detection is not None
        pad = self.config.turn_detection.prefix_padding_ms * 16
        audio = self._history.slice(b.start - pad, end)
        held = self._held
        if held is not None:
            audio = np.concatenate([held.audio, self._history.slice(held.end, end)])[-MAX_TURN_SAMPLES:]
        # Without a recognizer there is no verdict to wait for: nothing said is a command.
        waits = self.config.interrupt_mode is InterruptMode.COMMAND and self.has_recognizer
        self._held = _Held(held.item_id if held else self._new_id("item"), held.start if held else b.start, end,
                           audio, b.segment, ready=not waits)  # fmt: skip

    def _release_held(self, now: float) -> None:
        held = self._held
        if held is None or not held.ready or self.response is not None or self.speaking_at(now):
            return
        if self._barge is not None or self._turn_start is not None:
            return
        self._held = None
        td = self.config.turn_detection
        self._emit(SpeechStarted(held.item_id, ms(held.start)))
        self._emit(SpeechStopped(held.item_id, ms(held.end)))
        self._commit_audio(held.item_id, held.audio, now, respond=td is not None and td.create_response)

    def _check_command(self, kind: CheckKind, end: int) -> None:
        b = self._barge
        if b is None or not self.has_recognizer or b.matched is not None:
            return
        if kind == "partial" and b.partial_out:
            # One partial check at a time: on a slow recognizer a queue of them would hold up
            # the final check (and the verdict) by a recognizer call each.
            return
        b.checked_until = end
        audio = self._history.slice(b.start, end)
        if audio.size < MODEL_RATE // 10:
            return
        phrases = self.config.interrupt_phrases
        # The verdict concerns the answer playing now (the last one started); a later answer is
        # not its to cancel.
        ticket = self._ask(_CommandAsk(b.segment, self._last_response_id, end, phrases, kind))
        # A partial check is superseded by the next; one at a pause may become the final one.
        self._work.append(Transcribe(ticket, audio, bias_prompt(phrases), droppable=kind == "partial", command=True))
        if kind == "partial":
            b.partial_out = True
        elif kind == "pause":
            b.pause_ticket = ticket

    def recognized(self, ticket: int, text: str | None, now: float) -> None:
        """The recognizer's answer to a Transcribe (None: it failed or the job was dropped)."""
        ask = self._asks.pop(ticket, None)
        if isinstance(ask, _TranscriptAsk):
            self._emit(InputTranscript(ask.item_id, text or "", ask.audio_ms, failed=text is None))
        elif isinstance(ask, _CommandAsk):
            if ask.kind == "partial" and self._barge is not None and self._barge.segment == ask.segment:
                self._barge.partial_out = False
            phrase = match_phrase(text or "", ask.phrases)
            log.debug("barge-in segment %d heard %r -> %s", ask.segment, text, phrase)
            held = self._held
            if held is not None and held.segment == ask.segment:
                if phrase is not None:
                    self._held = None  # a command, not a question
                elif ask.final:
                    held.ready = True
                    self._release_held(now)
            if phrase is None:
                return
            if self._turn_segment == ask.segment and self._turn_start is not None:
                # A command said as the answer ended (its speech went on past the audio): not a turn.
                self._emit(SpeechStopped(self._turn_item or "", ms(ask.end)))
                self._turn_start = self._turn_item = self._turn_segment = None
            if self._barge is not None and self._barge.segment == ask.segment:
                self._barge.matched = phrase
            if self._interrupted_segment >= ask.segment:
                return  # this utterance already interrupted (an earlier check of it matched)
            if self._last_response_id != ask.response_id or not self.speaking_at(now):
                return
            self._interrupted_segment = ask.segment
            item = self._interrupt(phrase, ask.end)
            if self._barge is not None and self._barge.segment == ask.segment:
                self._barge.announced = item  # its speech_stopped comes when the command ends
            else:
                self._emit(SpeechStopped(item, ms(ask.end)))

    def _interrupt(self, phrase: str, detected_at: int, announce: bool = True) -> str:
        """Cancel the answer; returns the item of the speech_started sent (announce)."""
        r = self.response
        response_id = r.response_id if r is not None else self._last_response_id
        item = self._new_id("item") if announce else ""
        if announce:  # clients stop playback on speech_started
            self._emit(SpeechStarted(item, ms(detected_at)))
        self._emit(Interrupted(response_id, phrase, ms(detected_at)))
        self._playback_until = 0.0
        self.cancel_response("turn_detected")
        return item

    # ---------------- bookkeeping ----------------

    def _new_id(self, kind: str) -> str:
        return f"{kind}_{self._tag}{next(self._ids):06d}"

    def close(self) -> None:
        """The session ends: its response is cancelled and its audio let go at once. (Its owner
        is often held in reference cycles, e.g. a connection and its tasks, which only the
        rare full garbage collection frees; megabytes of audio per session must not wait
        for that.)"""
        self._drop_speculation()
        self.cancel_response("client_cancelled")
        self._history = AudioHistory(0)
        self._inputs.clear()
        self._held = None
        self._pending_image = None
