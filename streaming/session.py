"""One conversation: input audio -> VAD turn taking -> responses -> events, with barge-in.

Driven by plain method calls from one caller thread (the transport), plus callbacks from
the runner's and the recognizer's threads; a lock keeps the state consistent. Events come
out of `poll()`: the session's own events, then the current response's, in order. A
response that was cancelled or replaced never has another event forwarded (its id is no
longer current), so late frames of an old answer are dropped, never sent.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.audio import MAX_INPUT_SECONDS
from model.prompts import Task
from model.vision import NO_IMAGES, ImageError, image_pixels, preprocess

from .audio_in import MODEL_RATE, AudioHistory, InputResampler, InvalidAudio, input_decoder
from .config import InterruptMode, SessionConfig
from .detector import RecognizerWorker, bias_prompt, match_phrase
from .events import (
    AudioChunk,
    Event,
    InputCleared,
    InputCommitted,
    InputTimeout,
    InputTranscript,
    Interrupted,
    ResponseCreated,
    ResponseDone,
    SessionError,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
)
from .runner import ModelRunner, ResponseHandle, ResponseRequest
from .vad import WINDOW, SileroVAD, TurnDetector, VadEdge

if TYPE_CHECKING:
    from .semantic_turn import SmartTurn

log = logging.getLogger(__name__)

MAX_TURN_SAMPLES = int(MAX_INPUT_SECONDS * MODEL_RATE)
COMMAND_CHECK_EVERY = int(0.32 * MODEL_RATE)  # re-check a growing command segment this often
MAX_REMEMBERED_INPUTS = 8  # user items a response may still answer (audio up to 30 s each)


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
    matched: str | None = None
    final: bool = False


class Session:
    def __init__(
        self,
        runner: ModelRunner,
        vad: SileroVAD,
        recognizer: RecognizerWorker | None = None,
        config: SessionConfig | None = None,
        turn_model: SmartTurn | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_events: int = 4096,
    ) -> None:
        self.runner = runner
        self.vad = vad
        self.recognizer = recognizer
        self.turn_model = turn_model
        self.clock = clock
        self.config = config or SessionConfig()
        self._lock = threading.RLock()
        self._events: queue.Queue[Event] = queue.Queue(maxsize=max_events)
        self._ids = itertools.count(1)
        self._segments = itertools.count(1)
        self._reset_input()
        self.response: ResponseHandle | None = None
        self._playback_until = 0.0  # clock time the sent audio finishes playing
        self._response_audio_ms = 0.0
        self._speech_end_at: float | None = None  # clock time the user's turn ended, for ttfa
        self._ttfa_ms: float | None = None
        self._barge: _Barge | None = None
        self._interrupted_segment = 0  # the barge-in segment that already interrupted (one per utterance)
        self._inputs: OrderedDict[str, tuple[np.ndarray | None, str | None]] = OrderedDict()  # what responses answer
        self._idle_from: float | None = None  # idle_timeout_ms counts from this clock time
        self._pending_image: torch.Tensor | None = None  # CLIP pixels for the next audio turn
        self._last_response_id = ""
        self._response_text = ""  # transcript forwarded so far for the current response

    # ---------------- configuration ----------------

    def _reset_input(self) -> None:
        self._resampler = InputResampler(self.config.input_sample_rate)
        self._decode = input_decoder(self.config.input_format)
        self._vad_stream = self.vad.stream()
        td = self.config.turn_detection
        self._turns = TurnDetector(td, self._score_turn) if td else None
        self._history = AudioHistory(MAX_TURN_SAMPLES + 10 * MODEL_RATE)
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples not yet seen by the VAD
        self._turn_start: int | None = None  # absolute sample where the open user turn begins
        self._turn_item: str | None = None
        self._buffer_start = 0  # push-to-talk: audio since the last commit/clear

    def update(self, config: SessionConfig) -> None:
        with self._lock:
            rate_changed = (config.input_sample_rate, config.input_format) != (
                self.config.input_sample_rate,
                self.config.input_format,
            )
            vad_changed = config.turn_detection != self.config.turn_detection
            self.config = config
            if rate_changed or vad_changed:
                now = self._history.end
                self._reset_input()
                self._history.start = now  # keep the input timeline monotonic
                self._buffer_start = now

    # ---------------- events ----------------

    def _emit(self, event: Event) -> None:
        try:
            self._events.put_nowait(event)
        except queue.Full:
            log.warning("session event queue full; dropping %s", type(event).__name__)

    def poll(self) -> list[Event]:
        """Everything that happened since the last call, in order."""
        out: list[Event] = []
        with self._lock:
            self._check_idle()
            while True:
                try:
                    out.append(self._events.get_nowait())
                except queue.Empty:
                    break
            h = self.response
            taken = len(out)
            if h is not None:
                while True:
                    try:
                        ev = h.events.get_nowait()
                    except queue.Empty:
                        break
                    out.append(self._on_response_event(h, ev))
                    if isinstance(ev, ResponseDone):
                        break
                if len(out) > taken:  # room was made (and maybe playback started): the runner may step
                    self.runner.wake()
        return out

    def _on_response_event(self, h: ResponseHandle, ev: Event) -> Event:
        now = self.clock()
        if isinstance(ev, AudioChunk):
            if h.first_audio_sent_at is None:
                h.mark_audio_sent(now)
                self._playback_until = now
                if self._speech_end_at is not None:
                    self._ttfa_ms = (now - self._speech_end_at) * 1000
            duration = len(ev.pcm) / 2 / 24000
            self._playback_until = max(self._playback_until, now) + duration
            self._response_audio_ms += duration * 1000
        elif isinstance(ev, TranscriptDelta):
            self._response_text += ev.delta
        elif isinstance(ev, ResponseDone):
            timings = dict(ev.timings)
            timings["ttfa_ms"] = round(self._ttfa_ms, 2) if self._ttfa_ms is not None else None
            ev = replace(ev, timings=timings)
            self.response = None
            self._idle_from = max(now, self._playback_until)
        return ev

    def _check_idle(self) -> None:
        """server_vad idle_timeout_ms: no speech for that long after the last answer finished
        playing -> the silence is committed as a user turn and answered (as OpenAI does)."""
        td = self.config.turn_detection
        if td is None or td.idle_timeout_ms is None or self._idle_from is None:
            return
        if self.response is not None or self._turn_start is not None or self._barge is not None:
            return
        now = self.clock()
        if now - self._idle_from < td.idle_timeout_ms / 1000:
            return
        self._idle_from = None
        end = self._history.end
        start = max(self._history.start, self._buffer_start, end - td.idle_timeout_ms * MODEL_RATE // 1000)
        item = self._new_id("item")
        self._emit(InputTimeout(item, ms(start), ms(end)))
        self._commit_audio(item, self._history.slice(start, end), respond=td.create_response)

    @property
    def assistant_speaking(self) -> bool:
        """Generating, or the audio already sent has not finished playing."""
        return self.response is not None or self.clock() < self._playback_until

    # ---------------- input audio ----------------

    def append_audio(self, pcm: bytes) -> None:
        """Mono audio in the configured input format (PCM16 or G.711) and rate, any chunk size."""
        try:
            audio = self._decode(pcm)
        except InvalidAudio as e:
            self._emit(SessionError("invalid_audio", str(e)))
            return
        with self._lock:
            audio16 = self._resampler.process(audio)
            self._history.append(audio16)
            self._pending = np.concatenate([self._pending, audio16])
            n_windows = self._pending.size // WINDOW
            base = self._history.end - self._pending.size
            for w in range(n_windows):
                window = self._pending[w * WINDOW : (w + 1) * WINDOW]
                self._on_window(window, base + w * WINDOW)
            self._pending = self._pending[n_windows * WINDOW :]
            self._check_turn_limit()

    def _on_window(self, window: np.ndarray, start: int) -> None:
        prob = self._vad_stream.prob(window)
        if self._turns is None:
            return
        edge = self._turns.update(prob, start)
        if self._barge is not None:
            self._on_barge_window(edge, start + WINDOW)
            return
        if edge is None:
            return
        if edge.kind == "start":
            self._idle_from = None
            if self.assistant_speaking and self._barge_applies():
                self._start_barge(edge.sample)
                return
            self._open_turn(edge.sample)
        elif self._turn_start is not None:
            self._emit(SpeechStopped(self._turn_item or "", ms(edge.sample)))
            self._commit_turn(self._turn_start, edge.sample, respond=self._turns.cfg.create_response)

    def _score_turn(self, end: int) -> float | None:
        """semantic_vad: p(complete) of the open turn up to `end` (runs on the caller's worker thread)."""
        if self.turn_model is None or self._turn_start is None:
            return None
        audio = self._history.slice(self._turn_start, end)
        t0 = time.perf_counter()
        p = self.turn_model.probability(audio)
        log.debug("end-of-turn model: p(complete)=%.3f on %d ms in %.0f ms", p, ms(audio.size),
                  (time.perf_counter() - t0) * 1000)  # fmt: skip
        return p

    def _barge_applies(self) -> bool:
        td = self.config.turn_detection
        return td is not None and td.interrupt_response

    def _open_turn(self, speech_start: int) -> None:
        assert self.config.turn_detection is not None
        self._turn_item = self._new_id("item")
        self._turn_start = max(self._history.start, speech_start - self.config.turn_detection.prefix_padding_ms * 16)
        self._emit(SpeechStarted(self._turn_item, ms(speech_start)))

    def _check_turn_limit(self) -> None:
        start = self._turn_start if self._turns is not None else self._buffer_start
        if start is None or self._history.end - start < MAX_TURN_SAMPLES:
            return
        cut = start + MAX_TURN_SAMPLES
        self._emit(SessionError("input_too_long", "the turn reached the model's 30 s window: committed at the limit"))
        if self._turns is not None:
            self._commit_turn(start, cut, truncated=True, respond=self._turns.cfg.create_response)
            # The speech goes on: what follows is a new turn.
            self._turn_item = self._new_id("item")
            self._turn_start = cut
            self._emit(SpeechStarted(self._turn_item, ms(cut)))
        else:
            self._commit_audio(self._new_id("item"), self._history.slice(start, cut), truncated=True, respond=False)
            self._buffer_start = cut

    def _commit_turn(self, start: int, end: int, respond: bool, truncated: bool = False) -> None:
        item = self._turn_item or self._new_id("item")
        self._turn_start = None
        self._turn_item = None
        self._commit_audio(item, self._history.slice(start, end), truncated, respond)

    def _commit_audio(self, item: str, audio: np.ndarray, truncated: bool = False, respond: bool = False) -> None:
        """A user audio item; answered at once only when turn detection ended it with create_response
        (as OpenAI: a client's commit, or create_response false, waits for response.create)."""
        self._emit(InputCommitted(item, ms(audio.size), truncated))
        self._speech_end_at = self.clock()
        self._remember(item, audio, None)
        if self.config.transcribe_input and self.recognizer is not None:
            self._transcribe(item, audio)
        if respond:
            self._start_response(item)

    def _transcribe(self, item: str, audio: np.ndarray) -> None:
        def on_text(text: str | None) -> None:
            self._emit(InputTranscript(item, text or "", ms(audio.size), failed=text is None))

        assert self.recognizer is not None
        if not self.recognizer.submit(audio, None, on_text, wait=False):
            self._emit(InputTranscript(item, "", ms(audio.size), failed=True))

    def _remember(self, item: str, audio: np.ndarray | None, text: str | None) -> None:
        self._inputs[item] = (audio, text)
        self._inputs.move_to_end(item)
        while len(self._inputs) > MAX_REMEMBERED_INPUTS:
            self._inputs.popitem(last=False)

    def forget(self, item: str) -> None:
        """A user item was deleted from the conversation: it is answered no more."""
        with self._lock:
            self._inputs.pop(item, None)

    def has_input(self, item: str) -> bool:
        return item in self._inputs

    def commit(self) -> None:
        """End the user turn now (push-to-talk, or forcing the end with server VAD)."""
        with self._lock:
            start = self._turn_start if self._turns is not None else self._buffer_start
            end = self._history.end
            if start is None or end - start <= 0:
                self._emit(SessionError("input_audio_buffer_commit_empty", "there is no uncommitted audio to commit"))
                return
            if self._turns is not None:
                self._turns.reset()
                self._commit_turn(start, end, respond=False)
            else:
                self._buffer_start = end
                self._commit_audio(self._new_id("item"), self._history.slice(start, end))

    def clear(self) -> None:
        with self._lock:
            self._buffer_start = self._history.end
            self._turn_start = None
            self._turn_item = None
            if self._turns is not None:
                self._turns.reset()
            self._emit(InputCleared())

    def add_audio(self, pcm: bytes, item_id: str | None = None) -> str | None:
        """A whole user audio message (in the input format and rate), outside the VAD stream."""
        try:
            audio = self._decode(pcm)
        except InvalidAudio as e:
            self._emit(SessionError("invalid_audio", str(e)))
            return None
        with self._lock:
            resampler = InputResampler(self.config.input_sample_rate)
            audio16 = np.concatenate([resampler.process(audio), resampler.flush()])
            if audio16.size == 0:
                self._emit(SessionError("invalid_audio", "the audio message is empty"))
                return None
            if audio16.size > MAX_TURN_SAMPLES:
                self._emit(SessionError("input_too_long", "audio message longer than 30 s: cut at the limit"))
                audio16 = audio16[:MAX_TURN_SAMPLES]
            item = item_id or self._new_id("item")
            self._remember(item, audio16, None)
            return item

    def report_playback(self, played_ms: float) -> None:
        """The client's real playback position in the current answer (pacing and barge-in window)."""
        with self._lock:
            h = self.response
            now = self.clock()
            if h is not None and h.first_audio_sent_at is not None:
                h.first_audio_sent_at = now - played_ms / 1000
            self._playback_until = now + max(0.0, self._response_audio_ms - played_ms) / 1000
            self.runner.wake()

    # ---------------- text turns and responses ----------------

    def add_image(self, image: bytes | object, item_id: str | None = None) -> str | None:
        """A user image (PNG/JPEG/WebP bytes, a PIL image from model.vision.decode_image, or
        its model.vision.preprocess pixels): the next audio turn is answered about it
        (Mini-Omni2's image task; one image per turn, a newer image replaces a pending one).
        Only the 224 x 224 pixels are kept (~0.6 MB, whatever the image's size)."""
        if not self.runner.model.takes_images:
            self._emit(SessionError("image_not_supported", NO_IMAGES))
            return None
        if isinstance(image, bytes):
            try:
                image = image_pixels(image, self.config.max_image_bytes, self.config.max_image_pixels)
            except ImageError as e:
                self._emit(SessionError("invalid_image", str(e)))
                return None
        elif not isinstance(image, torch.Tensor):
            image = preprocess(image)
        with self._lock:
            self._pending_image = image
            return item_id or self._new_id("item")

    @property
    def image_pending(self) -> bool:
        return self._pending_image is not None

    def add_text(self, text: str, create_response: bool = False, item_id: str | None = None) -> str:
        with self._lock:
            item = item_id or self._new_id("item")
            self._remember(item, None, text)
            if create_response:
                self._start_response(item)
            return item

    def create_response(
        self,
        output_modalities: tuple[str, ...] | None = None,
        item_id: str | None = None,
        max_new_tokens: int | None = None,
    ) -> str | None:
        """Answer a user item (by default the latest: a committed turn or a message)."""
        with self._lock:
            if item_id is None and self._inputs:
                item_id = next(reversed(self._inputs))
            if item_id is None or item_id not in self._inputs:
                self._emit(SessionError("invalid_request", "there is no user input to respond to"))
                return None
            return self._start_response(item_id, output_modalities, max_new_tokens)

    def _start_response(
        self,
        item: str,
        output_modalities: tuple[str, ...] | None = None,
        max_new_tokens: int | None = None,
    ) -> str | None:
        audio, text = self._inputs[item]
        if self.response is not None:
            self._emit(SessionError(ACTIVE_RESPONSE, active_response_message(self.response.response_id)))
            return None
        modalities = output_modalities or self.config.output_modalities
        audio_out = "audio" in modalities
        image = None
        if audio is not None and self._pending_image is not None:
            # The release's image task always speaks; with text-only output its audio is not made.
            image, self._pending_image = self._pending_image, None
            task = Task.IMAGE_A1A2
        elif audio is not None:
            task = Task.A1A2 if audio_out else Task.A1T2
        else:
            task = Task.T1A2 if audio_out else Task.T1T2
        cfg = self.config
        request = ResponseRequest(
            task=task,
            audio=audio,
            text=text,
            image=image,
            audio_output=audio_out,
            sampling=cfg.sampling,
            max_new_tokens=max_new_tokens if max_new_tokens is not None else cfg.max_new_tokens,
            chunk_frames=cfg.chunk_frames,
            max_chunk_frames=cfg.max_chunk_frames,
            left_context_frames=cfg.left_context_frames,
            lookahead_frames=cfg.lookahead_frames,
            first_lookahead_frames=cfg.first_chunk_lookahead_frames,
            max_audio_lead_ms=cfg.max_audio_lead_ms,
        )
        response_id = self._new_id("resp")
        handle = ResponseHandle(response_id, self._new_id("item"), request)
        try:
            self.runner.submit(handle)
        except queue.Full:
            self._emit(SessionError("rate_limited", "the model is saturated; try again shortly"))
            return None
        self.response = handle
        self._last_response_id = response_id
        self._ttfa_ms = None
        self._response_audio_ms = 0.0
        self._response_text = ""
        self._idle_from = None
        self._emit(ResponseCreated(response_id, handle.item_id, task.value, audio_out=task.audio_out and audio_out))
        return response_id

    def cancel_response(self, reason: str = "client_cancelled") -> bool:
        with self._lock:
            return self._cancel(reason)

    def _cancel(self, reason: str) -> bool:
        h = self.response
        if h is None:
            return False
        h.cancel(reason)
        self.runner.wake()
        self.response = None  # nothing more of it is forwarded
        self._playback_until = 0.0
        # Drain what it produced but was not forwarded: only its transcript so far counts.
        self._emit(
            ResponseDone(
                h.response_id,
                h.item_id,
                "cancelled",
                reason,
                transcript=self._response_text,
                audio_ms=self._response_audio_ms,
            )
        )
        return True

    # ---------------- barge-in ----------------

    def _start_barge(self, speech_start: int) -> None:
        mode = self.config.interrupt_mode
        self._barge = _Barge(start=speech_start, segment=next(self._segments), checked_until=speech_start)
        if mode is InterruptMode.COMMAND:
            self._check_command(final=False)

    def _on_barge_window(self, edge: VadEdge | None, window_end: int) -> None:
        b = self._barge
        assert b is not None
        mode = self.config.interrupt_mode
        if edge is not None and edge.kind == "stop":
            b.final = True
            if mode is InterruptMode.COMMAND and b.matched is None:
                self._check_command(final=True, end=edge.sample)
            self._barge = None
            return
        if mode is InterruptMode.VAD:
            if ms(window_end - b.start) >= self.config.vad_interrupt_min_ms:
                # As OpenAI's server_vad: the speech that interrupts is the next user turn, and
                # its speech_started is the one that tells the client to stop playback.
                self._barge = None
                self._open_turn(b.start)
                self._interrupt("", b.start, announce=False)
        elif mode is InterruptMode.COMMAND and window_end - b.checked_until >= COMMAND_CHECK_EVERY:
            self._check_command(final=False, end=window_end)

    def _check_command(self, final: bool, end: int | None = None) -> None:
        b = self._barge
        if b is None or self.recognizer is None or b.matched is not None:
            return
        end = end if end is not None else self._history.end
        b.checked_until = end
        audio = self._history.slice(b.start, end)
        if audio.size < MODEL_RATE // 10:
            return
        segment = b.segment
        phrases = self.config.interrupt_phrases
        # The verdict concerns the answer playing now (the last one started); a later answer is
        # not its to cancel.
        asked_about = self._last_response_id

        def on_text(text: str | None) -> None:
            phrase = match_phrase(text or "", phrases)
            log.debug("barge-in segment %d heard %r -> %s", segment, text, phrase)
            if phrase is None:
                return
            with self._lock:
                if self._barge is not None and self._barge.segment == segment:
                    self._barge.matched = phrase
                if self._interrupted_segment >= segment:
                    return  # this utterance already interrupted (an earlier check of it matched)
                if self._last_response_id != asked_about or not self.assistant_speaking:
                    return
                self._interrupted_segment = segment
                self._interrupt(phrase, end)

        self.recognizer.submit(audio, bias_prompt(phrases), on_text, wait=final)

    def _interrupt(self, phrase: str, detected_at: int, announce: bool = True) -> None:
        h = self.response
        response_id = h.response_id if h is not None else self._last_response_id
        if announce:  # clients stop playback on speech_started
            self._emit(SpeechStarted(self._new_id("item"), ms(detected_at)))
        self._emit(Interrupted(response_id, phrase, ms(detected_at)))
        self._playback_until = 0.0
        if h is not None:
            self._cancel("turn_detected")

    # ---------------- bookkeeping ----------------

    def _new_id(self, kind: str) -> str:
        return f"{kind}_{next(self._ids):06d}"

    def close(self) -> None:
        with self._lock:
            self._cancel("client_cancelled")
