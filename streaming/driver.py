"""Driving a `Session`: its audio front end, its work, the answers coming back.

The path of one audio frame: wire bytes -> `AudioFrontEnd.process` (decode, resample to
16 kHz, silero's speech probability per 32 ms window; compute, so the server runs it in a
worker thread, one call at a time per connection) -> `Session.receive_audio` (turn taking,
barge-in; pure state) -> `Driver.perform` (the session's work: a response started on the
runner, a recognizer job queued) -> the runner's threads -> the response's events posted back
(`Driver.post`) -> `Driver.feed` -> `Session.response_event` -> `Session.take_events` -> wire.

`Driver` is shared by the server's connection (asyncio: `post` hands results to the event
loop) and `LocalSession` (one plain thread: tests, benchmarks, scripts).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.vision import ImageError, image_pixels, preprocess

from .audio_in import InputResampler, InvalidAudio, input_decoder
from .config import SessionConfig
from .detector import RecognizerWorker
from .events import (
    CancelResponse,
    ConfirmResponse,
    Event,
    PlaybackAt,
    ResponseDone,
    ScoreTurn,
    StartResponse,
    Transcribe,
    Work,
)
from .runner import ModelRunner, RunnerFull
from .session import Session
from .vad import WINDOW, SileroVAD

if TYPE_CHECKING:
    from .semantic_turn import SmartTurn

log = logging.getLogger(__name__)


class AudioFrontEnd:
    """Wire audio -> 16 kHz audio and the VAD's probability per completed window. Stateful
    (resampler, VAD state, a partial window): one call at a time, made anew when the session
    says its input restarts."""

    def __init__(self, vad: SileroVAD, config: SessionConfig) -> None:
        self.config = config
        self._decode = input_decoder(config.input_format)
        self._resampler = InputResampler(config.input_sample_rate)
        self._vad = vad.stream() if config.turn_detection is not None else None
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples not yet seen by the VAD

    def process(self, pcm: bytes) -> tuple[np.ndarray, list[float]]:
        """Raises InvalidAudio for bytes that are not audio in the configured format."""
        audio16 = self._resampler.process(self._decode(pcm))
        if self._vad is None:
            return audio16, []
        self._pending = np.concatenate([self._pending, audio16])
        n = self._pending.size // WINDOW
        probs = [self._vad.prob(self._pending[i * WINDOW : (i + 1) * WINDOW]) for i in range(n)]
        self._pending = self._pending[n * WINDOW :]
        return audio16, probs

    def whole(self, pcm: bytes) -> np.ndarray:
        """A whole audio message (not part of the stream) at 16 kHz."""
        resampler = InputResampler(self.config.input_sample_rate)
        audio = self._decode(pcm)
        return np.concatenate([resampler.process(audio), resampler.flush()])


# ---------------- answers posted back to the session's owner ----------------


@dataclass(frozen=True)
class RunnerOutput:
    event: Event


@dataclass(frozen=True)
class Recognized:
    ticket: int
    text: str | None


@dataclass(frozen=True)
class TurnScored:
    ticket: int
    p: float | None


Answer = RunnerOutput | Recognized | TurnScored


class Driver:
    """Does a session's work with the shared engines; their answers come back through `post`
    (called on their threads; must not block) and go into the session through `feed`, on the
    session owner's thread."""

    def __init__(
        self,
        session: Session,
        runner: ModelRunner,
        recognizer: RecognizerWorker | None,
        turn_model: SmartTurn | None,
        post: Callable[[Answer], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.runner = runner
        self.recognizer = recognizer
        self.turn_model = turn_model
        self.post = post
        self.clock = clock
        self.live: dict[str, int] = {}  # response id -> runner key, started and not ended

    def perform(self) -> None:
        """Do every piece of work the session asked for (answers may ask for more)."""
        while work := self.session.take_work():
            for w in work:
                self._do(w)

    def _do(self, w: Work) -> None:
        s = self.session
        if isinstance(w, StartResponse | ConfirmResponse):
            if isinstance(w, ConfirmResponse) and w.response_id in self.live:
                self.runner.release(self.live[w.response_id])
                return
            held = isinstance(w, StartResponse) and w.speculative
            try:
                self.live[w.response_id] = self.runner.submit(w.response_id, w.item_id, w.request, self._sink, held)
            except RunnerFull as e:
                if not held:  # a speculation without a slot is simply not made; its confirm submits it
                    s.response_refused(w.response_id, str(e), self.clock())
        elif isinstance(w, CancelResponse):
            if w.response_id in self.live:
                self.runner.cancel(self.live[w.response_id], w.reason)
        elif isinstance(w, PlaybackAt):
            if w.response_id in self.live:
                # The runner paces on time.monotonic; the session's clock may be another one.
                self.runner.playback(self.live[w.response_id], time.monotonic() - (self.clock() - w.started_at))
        elif isinstance(w, Transcribe):
            ticket = w.ticket
            ok = self.recognizer is not None and self.recognizer.submit(
                w.audio,
                w.prompt,
                lambda text: self.post(Recognized(ticket, text)),
                droppable=w.droppable,
                urgent=w.command,
            )
            if not ok:
                s.recognized(ticket, None, self.clock())
        elif isinstance(w, ScoreTurn):
            self.score_turn(w)

    def _sink(self, event: Event) -> None:
        self.post(RunnerOutput(event))

    def score_turn(self, w: ScoreTurn) -> None:
        """Inline by default (a plain-thread owner); the server runs it in a worker thread."""
        self.post(TurnScored(w.ticket, self.turn_probability(w.audio)))

    def turn_probability(self, audio: np.ndarray) -> float | None:
        if self.turn_model is None:
            return None
        t0 = time.perf_counter()
        try:
            p = self.turn_model.probability(audio)
        except Exception:
            log.exception("the end-of-turn model failed")
            return None
        log.debug("end-of-turn model: p(complete)=%.3f on %d ms in %.0f ms", p, audio.size // 16,
                  (time.perf_counter() - t0) * 1000)  # fmt: skip
        return p

    def feed(self, answers: list[Answer]) -> None:
        """Answers into the session, in order; the runner's events are acknowledged (room for more)."""
        s = self.session
        now = self.clock()
        acks: dict[int, int] = {}
        for a in answers:
            if isinstance(a, RunnerOutput):
                rid = getattr(a.event, "response_id", "")
                key = self.live.pop(rid, None) if isinstance(a.event, ResponseDone) else self.live.get(rid)
                if key is not None:
                    acks[key] = acks.get(key, 0) + 1
                s.response_event(a.event, now)
            elif isinstance(a, Recognized):
                s.recognized(a.ticket, a.text, now)
            else:
                s.turn_scored(a.ticket, a.p, now)
        for key, n in acks.items():
            self.runner.ack(key, n)
        self.perform()

    def close(self) -> None:
        """The owner leaves: whatever still runs for it is cancelled."""
        self.session.close()
        self.perform()
        for key in self.live.values():
            self.runner.cancel(key, "client_cancelled")
        self.live.clear()


class LocalSession:
    """A session driven from one plain thread (tests, benchmarks, scripts): each call does the
    session's work at once, and `poll` collects the answers that came back meanwhile."""

    def __init__(
        self,
        runner: ModelRunner,
        vad: SileroVAD,
        recognizer: RecognizerWorker | None = None,
        config: SessionConfig | None = None,
        turn_model: SmartTurn | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_answers: int = 4096,
    ) -> None:
        self.vad = vad
        self.clock = clock
        self.session = Session(config, takes_images=runner.model.takes_images, recognizer=recognizer is not None,
                               turn_model=turn_model is not None)  # fmt: skip
        self._inbox: queue.Queue[Answer] = queue.Queue(maxsize=max_answers)
        self.driver = Driver(self.session, runner, recognizer, turn_model, self._inbox.put_nowait, clock)
        self.front = AudioFrontEnd(vad, self.session.config)
        self.runner = runner

    # the session's state, read-only
    @property
    def config(self) -> SessionConfig:
        return self.session.config

    @property
    def response(self) -> Any:
        return self.session.response

    @property
    def assistant_speaking(self) -> bool:
        return self.session.speaking_at(self.clock())

    @property
    def image_pending(self) -> bool:
        return self.session.image_pending

    def has_input(self, item: str) -> bool:
        return self.session.has_input(item)

    def _pump(self) -> None:
        answers: list[Answer] = []
        while True:
            try:
                answers.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        self.driver.feed(answers)

    def poll(self) -> list[Event]:
        """Everything that happened since the last call, in order."""
        self._pump()
        self.session.tick(self.clock())
        self.driver.perform()
        return self.session.take_events()

    def update(self, config: SessionConfig) -> None:
        if self.session.update(config):
            self.front = AudioFrontEnd(self.vad, config)

    def append_audio(self, pcm: bytes) -> None:
        try:
            audio16, probs = self.front.process(pcm)
        except InvalidAudio as e:
            self.session.error("invalid_audio", str(e))
            return
        self.session.receive_audio(audio16, probs, self.clock())
        self._pump()

    def commit(self) -> None:
        self.session.commit(self.clock())
        self.driver.perform()

    def clear(self) -> None:
        self.session.clear()

    def add_audio(self, pcm: bytes, item_id: str | None = None) -> str | None:
        try:
            audio16 = self.front.whole(pcm)
        except InvalidAudio as e:
            self.session.error("invalid_audio", str(e))
            return None
        return self.session.add_audio(audio16, item_id)

    def add_image(self, image: bytes | object, item_id: str | None = None) -> str | None:
        """PNG/JPEG/WebP bytes, a PIL image, or CLIP pixels."""
        if isinstance(image, bytes) and self.session.takes_images:
            try:
                image = image_pixels(image, self.config.max_image_bytes, self.config.max_image_pixels)
            except ImageError as e:
                self.session.error("invalid_image", str(e))
                return None
        elif not isinstance(image, (bytes, torch.Tensor)):
            image = preprocess(image)
        return self.session.add_image(image, item_id)  # type: ignore[arg-type]

    def add_text(self, text: str, create_response: bool = False, item_id: str | None = None) -> str:
        item = self.session.add_text(text, self.clock(), create_response, item_id)
        self.driver.perform()
        return item

    def create_response(
        self,
        output_modalities: tuple[str, ...] | None = None,
        item_id: str | None = None,
        max_new_tokens: int | None = None,
    ) -> str | None:
        rid = self.session.create_response(self.clock(), output_modalities, item_id, max_new_tokens)
        self.driver.perform()
        return rid

    def cancel_response(self, reason: str = "client_cancelled") -> bool:
        ok = self.session.cancel_response(reason)
        self.driver.perform()
        return ok

    def report_playback(self, played_ms: float) -> None:
        self.session.report_playback(played_ms, self.clock())
        self.driver.perform()

    def close(self) -> None:
        self.driver.close()
