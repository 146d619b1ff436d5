"""The model runner: three stages, each a thread that owns its state and is fed by messages.

- encoder thread: Whisper/CLIP turn a request into a prompt (a new turn's ~1 s encode slows the
  answers being decoded instead of stopping them), and tells the decode thread.
- decode thread (the runner proper): owns every response's state. Each round, new responses
  are prefilled one by one (their prompt lengths differ) and the decode steps of all others run
  together in one batched forward (continuous batching: responses join and leave between
  steps). A response steps only while its consumer keeps up (acknowledged events) and while it
  is not too far ahead of playback.
- SNAC thread: owns every response's audio decoder; decodes the ready windows of all answers
  together, then sends each answer's audio, and its `ResponseDone` after its last audio.

The consumer of a response gives a `sink` that each stage calls with the response's events, in
order; the sink must not block (the server posts them onto its event loop). The consumer
answers with `ack(response_id, n)` as it takes events and `playback(response_id, started_at)`
when playback starts; `cancel` ends a response within one step. Every response ends with
exactly one `ResponseDone`, made here and nowhere else.

A failure ends only the responses it touched: a failed batched step is retried response by
response (a step is retry-safe: nothing of it is kept unless it completes), so one bad row
fails only itself, with status "failed" and a generic message (details in the log).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from model.codec import SAMPLES_PER_FRAME, SNAC_SAMPLE_RATE, to_pcm16
from model.decoding import Generation, SamplingConfig, StepOutput, step_batch
from model.errors import InputError
from model.omni import OmniModel
from model.prompts import Prompt, Task

from .audio_out import StreamingSnacDecoder, decode_windows
from .config import STAGES, StageThreads
from .events import AudioChunk, Event, ResponseDone, TranscriptDelta

log = logging.getLogger(__name__)

FRAME_MS = SAMPLES_PER_FRAME / SNAC_SAMPLE_RATE * 1000  # 85.33
SERVER_ERROR_MESSAGE = "The server had an error while processing your request."  # OpenAI's wording
MAX_FRAMES_IN_SNAC = 16  # frames a response may have waiting on the SNAC thread

Sink = Callable[[Event], None]


class RunnerFull(Exception):
    """Every slot is taken (active + waiting responses): try again shortly."""


@dataclass(frozen=True)
class ResponseRequest:
    task: Task
    audio: np.ndarray | None = None  # 16 kHz mono, audio-in tasks
    text: str | None = None  # text-in tasks
    image: object | None = None  # image task (Mini-Omni2): CLIP pixels or a decoded PIL image
    audio_output: bool = True  # False: an audio-out task whose audio nobody wants (no SNAC work)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int | None = None
    chunk_frames: int = 1
    max_chunk_frames: int = 8  # streaming.config.SessionConfig says why
    left_context_frames: int = 3
    lookahead_frames: int = 3
    first_lookahead_frames: int | None = None  # opt-in fast start: less lookahead on the first chunk only
    max_audio_lead_ms: float = 1000.0
    stop_rules: bool = True  # False: run the whole budget (benchmarks of steady-state speed)

    @property
    def makes_audio(self) -> bool:
        """An audio-out task whose audio is wanted."""
        return self.task.audio_out and self.audio_output

    @property
    def generation_lead_ms(self) -> float:
        """How far frames may be made ahead of playback: the audio lead plus what the SNAC
        stage holds back (up to a chunk and its lookahead), so that up to max_audio_lead_ms
        (plus a frame) of audio is sent ahead of the listener. Bounding the frames by the audio
        lead alone left the listener ~no audio in hand at the server's 1 s: the 8 + 3 frames
        (939 ms) of the pipeline ate it, and every hiccup became a stall (README, Streaming
        engine)."""
        return self.max_audio_lead_ms + (self.max_chunk_frames + self.lookahead_frames) * FRAME_MS


def failure_message(exc: BaseException) -> str:
    """What a client is told of a failure: an input's own message, else a generic one."""
    return str(exc) if isinstance(exc, InputError) else SERVER_ERROR_MESSAGE


# ---------------- messages between the stages ----------------


@dataclass(frozen=True)
class _Submit:
    job: _Job


@dataclass(frozen=True)
class _Encoded:
    key: int
    prompt: Prompt | None
    encode_ms: float
    error: str | None = None
    threads: int = 0  # the encoder's torch threads for this encode


@dataclass(frozen=True)
class _Cancel:
    key: int
    reason: str


@dataclass(frozen=True)
class _Release:
    key: int


@dataclass(frozen=True)
class _Ack:
    key: int
    n: int


@dataclass(frozen=True)
class _Playback:
    key: int
    started_at: float  # monotonic time at which the response's audio position 0 played


@dataclass(frozen=True)
class _SnacProgress:
    """From the SNAC thread: frames it took and events it sent since the last report."""

    key: int
    frames: int
    events: int
    failed: bool = False


@dataclass(frozen=True)
class _Quit:
    pass


@dataclass
class _Job:
    """One response, as the decode thread sees it (only the decode thread touches it)."""

    key: int
    response_id: str
    item_id: str
    request: ResponseRequest
    sink: Sink
    t_submit: float = 0.0
    held: bool = False  # speculative: encode and prefill, then wait for `release`
    held_out: tuple[StepOutput | None, float, float] | None = None  # its prefill's output, not yet sent
    t_release: float | None = None
    prompt: Prompt | None = None
    gen: Generation | None = None
    audio: bool = False  # its frames go to the SNAC thread
    text_ids: list[int] = field(default_factory=list)
    text_sent: str = ""
    text_ended: bool = False
    steps: int = 0
    frames_made: int = 0
    frames_in_snac: int = 0
    events_sent: int = 0  # by this thread and (as reported) by the SNAC thread
    events_acked: int = 0
    play_start: float | None = None
    encode_ms: float = 0.0
    encode_threads: int = 0
    prefill_ms: float | None = None
    prefill_parts: int = 0  # forwards its prefill took before the last one (Generation.prefill_part)
    prefill_parts_s: float = 0.0
    t_prefill_done: float = 0.0
    first_frame_ms: float | None = None

    def emit(self, event: Event) -> None:
        self.events_sent += 1
        self.sink(event)


def _set_threads(n: int) -> int:
    """The calling thread's torch intra-op threads; returns what it reads back."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


class ModelRunner:
    def __init__(
        self,
        model: OmniModel,
        max_active: int = 16,
        max_pending: int = 32,
        max_unacked: int = 256,
        threads: StageThreads | None = None,
        prefill_chunk: int = 64,
    ) -> None:
        """prefill_chunk: while other answers are being decoded, a new prompt is prefilled in
        parts of at most this many positions, each followed by their batched step, instead of
        holding them for its whole prefill (0: never split)."""
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0, got {prefill_chunk}")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.threads = threads or StageThreads.for_cores()
        self.max_active = max_active
        self.max_unacked = max_unacked
        self._slots = threading.BoundedSemaphore(max_active + max_pending)
        # Bounded by the slots: at most one submit, one cancel per response; acks and playback
        # reports are coalesced per batch of events by the consumer.
        self._inbox: queue.Queue[Any] = queue.Queue(maxsize=64 * (max_active + max_pending))
        self._to_encode: queue.Queue[_Job | None] = queue.Queue(maxsize=max_active + max_pending + 1)
        self._encode_cancels: queue.Queue[int] = queue.Queue(maxsize=64 * (max_active + max_pending))
        self._to_snac: queue.Queue[Any] = queue.Queue(maxsize=(MAX_FRAMES_IN_SNAC + 4) * (max_active + 1))
        self._keys = itertools.count(1)
        self._jobs: dict[int, _Job] = {}  # every response not finished, the decode thread's own
        self._active: list[_Job] = []  # prefilled or stepping, in admission order
        self._thread = threading.Thread(target=self._run, name="omnivox-runner", daemon=True)
        self._decoder_thread = threading.Thread(target=self._run_snac, name="omnivox-snac", daemon=True)
        self._encoder_thread = threading.Thread(target=self._run_encoder, name="omnivox-encode", daemon=True)
        self.steps_total = 0  # written by the decode thread only
        # Answers the decode thread is stepping, published by it (an int: read from the
        # encoder thread to pick its thread count, never written there).
        self.answers_stepping = 0
        # torch intra-op threads as each stage's own thread reads them after setting its
        # budget (OpenMP's count is per thread: another library's setting on the main thread
        # says nothing about these); the encoder's for an encode alone and one beside answers.
        self._stage_read: dict[str, int] = {}

    def stage_threads(self) -> dict[str, int | None]:
        return {name: self._stage_read.get(name) for name in STAGES}

    def start(self) -> ModelRunner:
        self._thread.start()
        self._decoder_thread.start()
        self._encoder_thread.start()
        return self

    def close(self) -> None:
        """Cancel what runs (each gets its ResponseDone), then stop the three threads."""
        self._inbox.put(_Quit())
        self._thread.join(timeout=10)

    @property
    def active_count(self) -> int:
        """Responses the decode thread holds (encoding, waiting or stepping)."""
        return len(self._jobs)

    # ---------------- the consumers' side (any thread; never blocks) ----------------

    def submit(self, response_id: str, item_id: str, request: ResponseRequest, sink: Sink, held: bool = False) -> int:
        """Queue a response; returns its key (for cancel/ack/playback: response ids are the
        sessions' own and may repeat across sessions). Raises RunnerFull when every slot is taken.
        `held`: a speculation, encoded and prefilled now, sending nothing and stepping no
        further until `release` (or ended by `cancel`)."""
        if not self._slots.acquire(blocking=False):
            raise RunnerFull("the model is saturated; try again shortly")
        key = next(self._keys)
        job = _Job(key, response_id, item_id, request, sink, t_submit=time.perf_counter(), held=held)
        self._inbox.put_nowait(_Submit(job))  # before the encoder can report on it
        self._to_encode.put_nowait(job)
        return key

    def release(self, key: int) -> None:
        """A held response goes on: its prefill's output goes out and it steps from now on."""
        self._inbox.put_nowait(_Release(key))

    def cancel(self, key: int, reason: str = "client_cancelled") -> None:
        self._inbox.put_nowait(_Cancel(key, reason))
        self._encode_cancels.put_nowait(key)  # a cancelled job still waiting is not encoded

    def ack(self, key: int, n: int) -> None:
        """The consumer took n events of the response: room for more."""
        if n:
            self._inbox.put_nowait(_Ack(key, n))

    def playback(self, key: int, started_at: float) -> None:
        """Where playback stands: audio position 0 of the response played at `started_at`
        (time.monotonic); generation runs at most max_audio_lead_ms ahead of it."""
        self._inbox.put_nowait(_Playback(key, started_at))

    def stream(
        self, response_id: str, request: ResponseRequest, item_id: str = "", held: bool = False
    ) -> ResponseStream:
        """Submit a response for a plain-thread consumer (benchmarks, the model's own ASR);
        `held` as in `submit` (go on with `release(stream.key)`)."""
        return ResponseStream(self, response_id, item_id, request, held)

    # ---------------- decode thread ----------------

    def _run(self) -> None:
        self._stage_read["llm"] = _set_threads(self.threads.llm)
        progressed = False
        while True:
            # Block for the next message unless there is stepping to do; a response paused by
            # its playback lead is looked at again soon (time, not a message, frees it).
            paused_by_time = any(j.audio and j.play_start is not None for j in self._active)
            timeout = 0.0 if progressed else (0.01 if paused_by_time else 0.5)
            if self._drain_inbox(timeout):
                break
            self._admit()
            progressed = self._round(time.monotonic())
            self.answers_stepping = sum(1 for j in self._active if not j.held)
        for job in list(self._jobs.values()):
            self._finish(job, "cancelled", reason="server_shutdown")
        self._to_encode.put(None)
        self._to_snac.put(_Quit())
        self._encoder_thread.join(timeout=10)
        self._decoder_thread.join(timeout=10)

    def _drain_inbox(self, timeout: float) -> bool:
        """Apply every waiting message; True when told to quit."""
        try:
            msg = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            if isinstance(msg, _Quit):
                return True
            self._on_message(msg)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return False

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, _Submit):
            self._jobs[msg.job.key] = msg.job
            return
        job = self._jobs.get(msg.key)
        if job is None:
            return  # finished meanwhile: late acks, cancels and reports concern nothing
        if isinstance(msg, _Encoded):
            if msg.error is not None:
                self._finish(job, "failed", reason=msg.error)
            else:
                job.prompt, job.encode_ms, job.encode_threads = msg.prompt, msg.encode_ms, msg.threads
        elif isinstance(msg, _Cancel):
            self._finish(job, "cancelled", reason=msg.reason)
        elif isinstance(msg, _Release):
            job.held = False
            job.t_release = time.perf_counter()
            if job.held_out is not None:
                out, t0, t1 = job.held_out
                job.held_out = None
                self._after_step(job, out, t0, t1)
        elif isinstance(msg, _Ack):
            job.events_acked += msg.n
        elif isinstance(msg, _Playback):
            job.play_start = msg.started_at
        elif isinstance(msg, _SnacProgress):
            job.frames_in_snac -= msg.frames
            job.events_sent += msg.events
            if msg.failed:
                self._finish(job, "failed", reason=SERVER_ERROR_MESSAGE)

    def _admit(self) -> None:
        for job in list(self._jobs.values()):
            if len(self._active) >= self.max_active:
                return
            if job.prompt is None or job.gen is not None:
                continue
            req = job.request
            try:
                job.gen = self.model.start(job.prompt, req.sampling, req.max_new_tokens, req.stop_rules)
            except Exception as e:
                log.warning("response %s refused: %s", job.response_id, e)
                self._finish(job, "failed", reason=failure_message(e))
                continue
            job.prompt = None  # the generation holds it
            job.audio = req.makes_audio and self.model.codec is not None
            if job.audio:
                self._to_snac.put_nowait(("start", job.key, job.response_id, job.item_id, _decoder_args(req), job.sink))
            self._active.append(job)

    def _may_step(self, job: _Job, now: float) -> bool:
        req = job.request
        in_flight = job.events_sent - job.events_acked + job.frames_in_snac
        # Room at the consumer for what is in flight plus one step and its audio.
        if job.frames_in_snac > MAX_FRAMES_IN_SNAC or in_flight + req.lookahead_frames + 4 > self.max_unacked:
            return False
        if job.held and job.gen is not None and not job.gen.in_prefill:
            return False  # prefilled: waits for its release
        if not job.audio:
            return True
        played = 0.0 if job.play_start is None else (now - job.play_start) * 1000
        return job.frames_made * FRAME_MS - played < req.generation_lead_ms

    def _round(self, now: float) -> bool:
        """One step of every response that may step: prefills alone (their lengths differ),
        then all decode steps together in one batched forward (`model.decoding.step_batch`).
        While answers are being decoded, a prefill runs one part per round (prefill_chunk)."""
        decode: list[_Job] = []
        prefilled = False
        answering = sum(1 for j in self._active if j.gen is not None and not j.gen.in_prefill and not j.held)
        for job in list(self._active):
            if not self._may_step(job, now):
                continue
            gen = job.gen
            assert gen is not None
            if not gen.in_prefill:
                decode.append(job)
                continue
            prefilled = True
            t0 = time.perf_counter()
            try:
                if answering and self.prefill_chunk and gen.prefill_part(self.prefill_chunk):
                    # a part done: the rest waits for the next round, after the others' step
                    job.prefill_parts += 1
                    job.prefill_parts_s += time.perf_counter() - t0
                    continue
                out = gen.step()
            except Exception:
                self._fail(job, "prefill")
                continue
            if job.held:  # nothing goes out before the release
                job.held_out = (out, t0, time.perf_counter())
                continue
            self._after_step(job, out, t0, time.perf_counter())
        if decode:
            self._decode_batch(decode)
        return prefilled or bool(decode)

    def _decode_batch(self, batch: list[_Job]) -> None:
        t0 = time.perf_counter()
        try:
            outs = step_batch([job.gen for job in batch if job.gen is not None])
        except Exception:
            if len(batch) == 1:
                self._fail(batch[0], "decode step")
                return
            # A failed step keeps nothing (step_batch is all or nothing): each response retries
            # alone, so one bad row fails only itself.
            log.exception("batched decode step of %d responses failed; retrying each alone", len(batch))
            for job in batch:
                self._decode_batch([job])
            return
        t1 = time.perf_counter()
        for job, out in zip(batch, outs, strict=True):
            self._after_step(job, out, t0, t1)

    def _fail(self, job: _Job, stage: str) -> None:
        log.exception("response %s failed in its %s", job.response_id, stage)
        self._finish(job, "failed", reason=SERVER_ERROR_MESSAGE)

    def _after_step(self, job: _Job, out: StepOutput | None, t0: float, t1: float) -> None:
        if out is None:
            self._end(job)
            return
        self.steps_total += 1
        job.steps += 1
        if job.prefill_ms is None:
            job.prefill_ms = (t1 - t0 + job.prefill_parts_s) * 1000
            job.t_prefill_done = t1
        self._emit_text(job, out.text)
        if out.frame is not None and job.audio:
            job.frames_made += 1
            if job.first_frame_ms is None:
                start = job.t_release if job.t_release is not None else job.t_submit
                job.first_frame_ms = (max(t1, start) - start) * 1000  # a speculation's: from its release
            job.frames_in_snac += 1
            self._to_snac.put_nowait(("frame", job.key, out.frame))

    def _end(self, job: _Job) -> None:
        assert job.gen is not None
        budget = job.gen.stop == "budget"
        self._finish(job, "incomplete" if budget else "completed", reason="max_output_tokens" if budget else None)

    def _emit_text(self, job: _Job, token: int) -> None:
        lay = self.model.layout
        if job.text_ended or token >= lay.text_special_base:  # _pad_t and other specials say nothing
            job.text_ended = job.text_ended or token == lay.eot
            return
        job.text_ids.append(token)
        text = self.model.tokenizer.decode(job.text_ids)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the rest
        delta, job.text_sent = text[len(job.text_sent) :], text
        if delta:
            job.emit(TranscriptDelta(job.response_id, job.item_id, delta))

    def _finish(self, job: _Job, status: str, reason: str | None = None) -> None:
        """The one place a response ends: its ResponseDone goes out through the SNAC thread,
        after its last audio."""
        if self._jobs.pop(job.key, None) is None:
            return
        if job in self._active:
            self._active.remove(job)
        self._slots.release()
        usage: dict[str, int] = {}
        timings: dict[str, float | int | None] = {}
        if job.gen is not None:
            prompt_tokens = job.gen.prompt.length
            usage = {
                "input_tokens": prompt_tokens,
                "output_tokens": job.steps,
                "total_tokens": prompt_tokens + job.steps,
            }
            decode_s = time.perf_counter() - job.t_prefill_done if job.steps > 1 else 0.0
            timings = {
                "encode_ms": round(job.encode_ms, 2),
                "encode_threads": job.encode_threads,
                "prefill_ms": round(job.prefill_ms, 2) if job.prefill_ms is not None else None,
                "prefill_parts": job.prefill_parts + 1,
                "first_frame_ms": round(job.first_frame_ms, 2) if job.first_frame_ms is not None else None,
                "steps": job.steps,
                "steps_per_s": round((job.steps - 1) / decode_s, 2) if decode_s > 0 else None,
            }
            if job.t_release is not None:  # a speculation: how long its prefill was done before the turn ended
                timings["speculation_lead_ms"] = round((job.t_release - job.t_prefill_done) * 1000, 2)
        done = ResponseDone(job.response_id, job.item_id, status, reason, transcript=job.text_sent, usage=usage,
                            timings=timings)  # fmt: skip
        job.gen = None  # the KV cache goes with it, now: an idle runner must not pin a finished answer
        flush = status in ("completed", "incomplete")  # a cancelled or failed answer stops where it is
        self._to_snac.put_nowait(("finish", job.key, done, job.sink, flush))

    # ---------------- encoder thread ----------------

    def _run_encoder(self) -> None:
        """Whisper (and CLIP) encode each request's inputs into its prompt, in submit order."""
        budget = self.threads
        self._stage_read["encoder_busy"] = _set_threads(budget.encoder_busy)
        self._stage_read["encoder"] = threads = _set_threads(budget.encoder)
        cancelled: OrderedDict[int, None] = OrderedDict()  # keys cancelled before their encode began
        while (job := self._to_encode.get()) is not None:
            while True:
                try:
                    cancelled[self._encode_cancels.get_nowait()] = None
                except queue.Empty:
                    break
            while len(cancelled) > 1024:  # mostly keys already encoded: forget the oldest
                cancelled.popitem(last=False)
            if job.key in cancelled:  # e.g. a dropped speculation: its end went out when it was cancelled
                del cancelled[job.key]
                continue
            # All cores for an encode alone; fewer beside answers being decoded, whose steps
            # must keep their audio ahead of playback.
            want = budget.encoder_busy if self.answers_stepping else budget.encoder
            if want != threads:
                threads = _set_threads(want)
            req = job.request
            t0 = time.perf_counter()
            try:
                prompt = self.model.prompt(req.task, audio=req.audio, text=req.text, image=req.image)
            except Exception as e:
                if isinstance(e, InputError):
                    log.warning("response %s refused: %s", job.response_id, e)
                else:
                    log.exception("response %s failed in its encode", job.response_id)
                self._inbox.put_nowait(_Encoded(job.key, None, 0.0, error=failure_message(e)))
                continue
            self._inbox.put_nowait(_Encoded(job.key, prompt, (time.perf_counter() - t0) * 1000, threads=threads))

    # ---------------- SNAC thread ----------------

    def _run_snac(self) -> None:
        """The windows of every answer that are ready decode together; each answer's audio and
        its end go to its sink in order."""
        self._stage_read["snac"] = _set_threads(self.threads.snac)
        state = _SnacState()
        while True:
            items = [self._to_snac.get()]
            while True:  # whatever else is waiting joins this round
                try:
                    items.append(self._to_snac.get_nowait())
                except queue.Empty:
                    break
            quit_now = self._snac_round(state, items)
            for key, (frames, events, failed) in state.report().items():
                self._inbox.put_nowait(_SnacProgress(key, frames, events, failed))
            if quit_now:
                return

    def _snac_round(self, state: _SnacState, items: list[Any]) -> bool:
        quit_now = False
        touched: list[int] = []
        for item in items:
            if isinstance(item, _Quit):
                quit_now = True
            elif item[0] == "start":
                _, key, rid, item_id, args, sink = item
                assert self.model.codec is not None  # audio jobs exist only with a codec
                decoder = StreamingSnacDecoder(self.model.codec, self.model.layout.num_codes, *args)
                state.streams[key] = _AudioStream(decoder, sink, rid, item_id)
            elif item[0] == "frame":
                _, key, frame = item
                state.count(key, frames=1)
                stream = state.streams.get(key)
                if stream is not None:
                    stream.decoder.add(frame)
                    if key not in touched:
                        touched.append(key)
            else:  # finish: the rest of its audio (unless it was cut short), then its end
                _, key, done, sink, flush = item
                self._decode_ready(state, touched)
                stream = state.streams.pop(key, None)
                audio_ms = 0.0
                if stream is not None:
                    if flush and not stream.broken:
                        self._decode_final(state, key, stream)
                    audio_ms = stream.decoder.emitted * FRAME_MS
                sink(replace(done, audio_ms=audio_ms))
        self._decode_ready(state, touched)
        return quit_now

    def _decode_ready(self, state: _SnacState, touched: list[int]) -> None:
        codec = self.model.codec
        while codec is not None:
            ready = []
            for key in touched:
                stream = state.streams.get(key)
                if stream is None or stream.broken:
                    continue
                window = stream.decoder.ready_window()
                if window is not None:
                    ready.append((key, stream, window))
            if not ready:
                return
            chunks: list[np.ndarray | None]
            try:
                chunks = list(decode_windows(codec, [w for _, _, w in ready]))
            except Exception:
                if len(ready) > 1:
                    log.exception("batched SNAC decode of %d answers failed; retrying each alone", len(ready))
                chunks = []
                for key, stream, window in ready:
                    try:
                        chunks.append(decode_windows(codec, [window])[0])
                    except Exception:
                        log.exception("response %s failed in its SNAC decode", stream.response_id)
                        stream.broken = True
                        state.count(key, failed=True)
                        chunks.append(None)
            for (key, stream, _), chunk in zip(ready, chunks, strict=True):
                if chunk is not None:
                    stream.send(chunk)
                    state.count(key, events=1)

    def _decode_final(self, state: _SnacState, key: int, stream: _AudioStream) -> None:
        try:
            chunks = stream.decoder.flush()
        except Exception:
            log.exception("response %s failed in its last SNAC decode", stream.response_id)
            return
        for chunk in chunks:
            stream.send(chunk)


def _decoder_args(req: ResponseRequest) -> tuple[int, int, int, int, int | None]:
    return (req.chunk_frames, req.left_context_frames, req.lookahead_frames, req.max_chunk_frames,
            req.first_lookahead_frames)  # fmt: skip


@dataclass
class _AudioStream:
    """One answer's audio, the SNAC thread's own."""

    decoder: StreamingSnacDecoder
    sink: Sink
    response_id: str = ""
    item_id: str = ""
    seq: int = 0
    broken: bool = False  # its decode failed: nothing more of it is decoded

    def send(self, chunk: np.ndarray) -> None:
        start_ms = (self.decoder.emitted * SAMPLES_PER_FRAME - chunk.size) / SNAC_SAMPLE_RATE * 1000
        self.sink(AudioChunk(self.response_id, self.item_id, self.seq, start_ms, to_pcm16(chunk).tobytes()))
        self.seq += 1


@dataclass
class _SnacState:
    streams: dict[int, _AudioStream] = field(default_factory=dict)
    _progress: dict[int, list[Any]] = field(default_factory=dict)

    def count(self, key: int, frames: int = 0, events: int = 0, failed: bool = False) -> None:
        p = self._progress.setdefault(key, [0, 0, False])
        p[0] += frames
        p[1] += events
        p[2] = p[2] or failed

    def report(self) -> dict[int, tuple[int, int, bool]]:
        out = {key: (p[0], p[1], p[2]) for key, p in self._progress.items()}
        self._progress.clear()
        return out


class ResponseStream:
    """A response read from a plain thread: its events in a queue, acknowledged as they are taken."""

    def __init__(
        self, runner: ModelRunner, response_id: str, item_id: str, request: ResponseRequest, held: bool = False
    ) -> None:
        self.runner = runner
        self.response_id = response_id
        # Bounded by the runner's max_unacked: it never sends more than that unacknowledged.
        self.events: queue.Queue[Event] = queue.Queue(maxsize=runner.max_unacked + 8)
        self.done: ResponseDone | None = None
        self.key = runner.submit(response_id, item_id, request, self.events.put_nowait, held)

    def get(self, timeout: float | None = None) -> Event:
        """The next event (queue.Empty after `timeout`)."""
        event = self.events.get(timeout=timeout)
        self.runner.ack(self.key, 1)
        if isinstance(event, ResponseDone):
            self.done = event
        return event

    def drain(self) -> list[Event]:
        out: list[Event] = []
        while True:
            try:
                out.append(self.get(timeout=0))
            except queue.Empty:
                return out

    def wait(self, timeout: float) -> ResponseDone | None:
        """Read (and drop) events until the response ends; None after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.done is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self.get(timeout=left)
            except queue.Empty:
                return None
        return self.done

    def cancel(self, reason: str = "client_cancelled") -> None:
        self.runner.cancel(self.key, reason)
