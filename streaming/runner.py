"""The model runner: one thread that owns the model and steps every active response.

Sessions submit `ResponseRequest`s and read typed events from each response's bounded
queue. Each round, new responses are prefilled one by one (their prompt lengths differ) and
the decode steps of all the others run together in one batched forward (continuous
batching: responses join and leave between steps), so many sessions' answers progress at
once for about the cost of one. Only a response whose consumer keeps up (queue room) and
that is not too far ahead of playback steps. SNAC decoding runs on a second thread,
overlapped with the next LLM step.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from model.codec import SAMPLES_PER_FRAME, SNAC_SAMPLE_RATE, to_pcm16
from model.decoding import Generation, SamplingConfig, StepOutput
from model.omni import OmniModel
from model.prompts import Prompt, Task

from .audio_out import StreamingSnacDecoder, decode_windows
from .events import AudioChunk, Event, ResponseDone, TranscriptDelta

log = logging.getLogger(__name__)

FRAME_MS = SAMPLES_PER_FRAME / SNAC_SAMPLE_RATE * 1000  # 85.33


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
    max_chunk_frames: int = 4
    left_context_frames: int = 3
    lookahead_frames: int = 3
    first_lookahead_frames: int | None = None  # opt-in fast start: less lookahead on the first chunk only
    max_audio_lead_ms: float = 1000.0
    stop_rules: bool = True  # False: run the whole budget (benchmarks of steady-state speed)


class ResponseHandle:
    """The session's side of one response: its events, cancellation and playback clock."""

    def __init__(self, response_id: str, item_id: str, request: ResponseRequest, max_events: int = 256) -> None:
        self.response_id = response_id
        self.item_id = item_id
        self.request = request
        self.events: queue.Queue[Event] = queue.Queue(maxsize=max_events)
        self.cancelled = threading.Event()
        self.cancel_reason = "client_cancelled"
        self.first_audio_sent_at: float | None = None  # set by the consumer: playback starts
        self.frames_made = 0
        self.done = threading.Event()

    def cancel(self, reason: str = "client_cancelled") -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    def mark_audio_sent(self, now: float) -> None:
        if self.first_audio_sent_at is None:
            self.first_audio_sent_at = now

    def audio_lead_ok(self, now: float) -> bool:
        """Generation may run at most max_audio_lead_ms of audio ahead of playback."""
        played = 0.0 if self.first_audio_sent_at is None else (now - self.first_audio_sent_at) * 1000
        req = self.request
        # Never below what the first exact chunk needs, or the first audio would never come.
        lead = max(req.max_audio_lead_ms, (req.max_chunk_frames + req.lookahead_frames + 1) * FRAME_MS)
        return self.frames_made * FRAME_MS - played < lead

    def has_room(self, needed: int = 8) -> bool:
        return self.events.maxsize - self.events.qsize() >= needed


@dataclass
class _Job:
    handle: ResponseHandle
    gen: Generation | None = None
    decoder: StreamingSnacDecoder | None = None
    text_ids: list[int] = field(default_factory=list)
    text_sent: str = ""
    pending_frames: int = 0  # frames handed to the decode thread, not yet decoded
    audio_seq: int = 0
    t_submit: float = 0.0
    prompt: Prompt | None = None  # set by the encoder thread
    encode_ms: float = 0.0
    prefill_ms: float | None = None
    t_prefill_done: float = 0.0
    first_frame_ms: float | None = None
    steps: int = 0
    done: ResponseDone | None = None
    text_ended: bool = False


class ModelRunner:
    def __init__(self, model: OmniModel, max_active: int = 16, max_pending: int = 32) -> None:
        self.model = model
        self.max_active = max_active
        self._requests: queue.Queue[_Job] = queue.Queue(maxsize=max_pending)
        # Encoded prompts waiting for their prefill: Whisper/CLIP run on their own thread, so a
        # new turn's ~1 s encode slows the answers being decoded instead of stopping them.
        self._encoded: queue.Queue[_Job] = queue.Queue(maxsize=max_pending)
        self._encoding = 0  # jobs the encoder thread holds (0 or 1)
        self._active: list[_Job] = []
        self._decode_jobs: queue.Queue[tuple[_Job, str, tuple[int, ...] | None]] = queue.Queue(maxsize=256)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="omnivox-runner", daemon=True)
        self._decoder_thread = threading.Thread(target=self._run_decoder, name="omnivox-snac", daemon=True)
        self._encoder_thread = threading.Thread(target=self._run_encoder, name="omnivox-encode", daemon=True)
        self.steps_total = 0
        # torch intra-op threads as each stage's own thread sees them (OpenMP's count is per
        # thread: another library's setting on the main thread says nothing about these).
        # One writer each; None until the thread runs.
        self.llm_threads: int | None = None
        self.encoder_threads: int | None = None
        self.snac_threads: int | None = None

    def stage_threads(self) -> dict[str, int | None]:
        return {"llm": self.llm_threads, "encoder": self.encoder_threads, "snac": self.snac_threads}

    def start(self) -> ModelRunner:
        self._thread.start()
        self._decoder_thread.start()
        self._encoder_thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._encoder_thread.join(timeout=10)
        self._decode_jobs.put((_Job(ResponseHandle("", "", ResponseRequest(Task.T1T2))), "quit", None))
        self._decoder_thread.join(timeout=10)

    @property
    def active_count(self) -> int:
        return len(self._active) + self._requests.qsize() + self._encoded.qsize() + self._encoding

    def submit(self, handle: ResponseHandle) -> None:
        """Queue a response; raises queue.Full when the runner is saturated."""
        self._requests.put_nowait(_Job(handle, t_submit=time.perf_counter()))
        self._wake.set()

    def wake(self) -> None:
        """Tell the runner that a consumer made room or playback advanced."""
        self._wake.set()

    # ---------------- runner thread ----------------

    def _run(self) -> None:
        self.llm_threads = torch.get_num_threads()
        while not self._stop.is_set():
            self._admit()
            try:
                progressed = self._round(time.monotonic())
            except Exception as e:  # a broken step must not stop the runner
                log.exception("decode round failed")
                for job in list(self._active):
                    self._finish(job, "failed", reason=str(e))
                progressed = True
            if not progressed:
                self._wake.wait(0.01)
                self._wake.clear()
        for job in list(self._active):
            job.handle.cancel("server_shutdown")
            self._finish(job, "cancelled", reason="server_shutdown")

    def _round(self, now: float) -> bool:
        """One step of every response that may step: prefills alone (their lengths differ),
        then all decode steps together in one batched forward."""
        decode: list[_Job] = []
        progressed = False
        for job in list(self._active):
            h = job.handle
            if h.cancelled.is_set():
                self._finish(job, "cancelled", reason=h.cancel_reason)
                progressed = True
                continue
            if not self._may_step(job, now):
                continue
            assert job.gen is not None
            if job.gen.in_prefill:
                t0 = time.perf_counter()
                out = job.gen.step()
                self._after_step(job, out, t0, time.perf_counter())
                progressed = True
            else:
                decode.append(job)
        if not decode:
            return progressed
        batch: list[tuple[_Job, torch.Tensor, int]] = []
        for job in decode:
            assert job.gen is not None
            nxt = job.gen.begin_step()
            if nxt is None:
                self._after_step(job, None, 0.0, 0.0)
            else:
                batch.append((job, nxt[0], nxt[1]))
        if batch:
            t0 = time.perf_counter()
            groups, row = [], 0
            for job, embeds, pos in batch:
                assert job.gen is not None
                groups.append((job.gen.cache, pos, slice(row, row + embeds.shape[0])))
                row += embeds.shape[0]
            with torch.inference_mode():
                hidden = self.model.llm.hidden_step_batched(torch.cat([e for _, e, _ in batch]), groups)
            outs = []
            for (job, _, _), (_, _, rows) in zip(batch, groups, strict=True):
                assert job.gen is not None
                outs.append(job.gen.finish_step(hidden[rows]))
            t1 = time.perf_counter()
            for (job, _, _), out in zip(batch, outs, strict=True):
                self._after_step(job, out, t0, t1)
        return True

    def _may_step(self, job: _Job, now: float) -> bool:
        h, req = job.handle, job.handle.request
        # Room for everything already in flight plus one more step, so no thread ever blocks on a put.
        if not h.has_room(job.pending_frames + req.lookahead_frames + 4) or job.pending_frames > 16:
            return False  # the consumer or the SNAC thread is behind: wait for it
        return job.decoder is None or h.audio_lead_ok(now)

    def _admit(self) -> None:
        while len(self._active) < self.max_active:
            try:
                job = self._encoded.get_nowait()
            except queue.Empty:
                return
            if job.handle.cancelled.is_set():
                self._finish(job, "cancelled", reason=job.handle.cancel_reason)
                continue
            req = job.handle.request
            assert job.prompt is not None
            try:
                job.gen = self.model.start(job.prompt, req.sampling, req.max_new_tokens, req.stop_rules)
            except Exception as e:
                log.warning("response %s refused: %s", job.handle.response_id, e)
                self._finish(job, "failed", reason=str(e))
                continue
            if req.task.audio_out and req.audio_output and self.model.codec is not None:
                job.decoder = StreamingSnacDecoder(
                    self.model.codec,
                    self.model.layout.num_codes,
                    req.chunk_frames,
                    req.left_context_frames,
                    req.lookahead_frames,
                    req.max_chunk_frames,
                    req.first_lookahead_frames,
                )
            self._active.append(job)

    def _after_step(self, job: _Job, out: StepOutput | None, t0: float, t1: float) -> None:
        h = job.handle
        if out is None:
            assert job.gen is not None
            stop = job.gen.stop
            status = "incomplete" if stop == "budget" else "completed"
            self._finish(job, status, reason="max_output_tokens" if stop == "budget" else None)
            return
        self.steps_total += 1
        job.steps += 1
        if job.prefill_ms is None:
            job.prefill_ms = (t1 - t0) * 1000
            job.t_prefill_done = t1
        self._emit_text(job, out.text)
        if out.frame is not None and job.decoder is not None:
            h.frames_made += 1
            if job.first_frame_ms is None:
                job.first_frame_ms = (t1 - job.t_submit) * 1000
            job.pending_frames += 1
            self._decode_jobs.put((job, "frame", out.frame))

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
            job.handle.events.put(TranscriptDelta(job.handle.response_id, job.handle.item_id, delta))

    def _finish(self, job: _Job, status: str, reason: str | None = None) -> None:
        if job in self._active:
            self._active.remove(job)
        usage = {}
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
                "prefill_ms": round(job.prefill_ms, 2) if job.prefill_ms is not None else None,
                "first_frame_ms": round(job.first_frame_ms, 2) if job.first_frame_ms is not None else None,
                "steps": job.steps,
                "steps_per_s": round((job.steps - 1) / decode_s, 2) if decode_s > 0 else None,
            }
        done = ResponseDone(
            job.handle.response_id,
            job.handle.item_id,
            status,
            reason,
            transcript=job.text_sent,
            usage=usage,
            timings=timings,
        )
        job.done = done
        job.gen = None  # the KV cache goes with it, now: an idle runner must not pin a finished answer
        # Through the SNAC thread, so the end comes after the last audio of this response.
        self._decode_jobs.put((job, "finish", None))

    # ---------------- encoder thread ----------------

    def _run_encoder(self) -> None:
        """Whisper (and CLIP) encode each request's inputs into its prompt, in submit order."""
        self.encoder_threads = torch.get_num_threads()
        while not self._stop.is_set():
            try:
                job = self._requests.get(timeout=0.05)
            except queue.Empty:
                continue
            self._encoding = 1
            try:
                if job.handle.cancelled.is_set():
                    self._finish(job, "cancelled", reason=job.handle.cancel_reason)
                    continue
                req = job.handle.request
                try:
                    t0 = time.perf_counter()
                    job.prompt = self.model.prompt(req.task, audio=req.audio, text=req.text, image=req.image)
                    job.encode_ms = (time.perf_counter() - t0) * 1000
                except Exception as e:
                    log.warning("response %s refused: %s", job.handle.response_id, e)
                    self._finish(job, "failed", reason=str(e))
                    continue
                while not self._stop.is_set():  # bounded hand-over; the runner drains it every round
                    try:
                        self._encoded.put(job, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                self._wake.set()
            finally:
                self._encoding = 0

    # ---------------- SNAC thread ----------------

    def _run_decoder(self) -> None:
        """SNAC thread: the windows of every answer that are ready decode together."""
        self.snac_threads = torch.get_num_threads()
        while True:
            items = [self._decode_jobs.get()]
            while True:  # whatever else is waiting joins this round
                try:
                    items.append(self._decode_jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                quit_now = self._decode_round(items)
            except Exception:
                log.exception("SNAC decoding failed")
                quit_now = any(kind == "quit" for _, kind, _ in items)
            self._wake.set()
            if quit_now:
                return

    def _decode_round(self, items: list[tuple[_Job, str, tuple[int, ...] | None]]) -> bool:
        quit_now = False
        touched: list[_Job] = []
        finishing: list[_Job] = []
        for job, kind, frame in items:
            if kind == "quit":
                quit_now = True
            elif kind == "frame":
                job.pending_frames -= 1
                if not job.handle.cancelled.is_set() and job.decoder is not None and frame is not None:
                    job.decoder.add(frame)
                    if job not in touched:
                        touched.append(job)
            elif kind == "finish":
                finishing.append(job)
        codec = self.model.codec
        while codec is not None:
            ready = []
            for job in touched:
                if job.decoder is not None and not job.handle.cancelled.is_set():
                    window = job.decoder.ready_window()
                    if window is not None:
                        ready.append((job, window))
            if not ready:
                break
            for (job, _), chunk in zip(ready, decode_windows(codec, [w for _, w in ready]), strict=True):
                self._emit_audio(job, chunk)
        for job in finishing:
            h = job.handle
            if not h.cancelled.is_set() and job.decoder is not None:
                for chunk in job.decoder.flush():
                    self._emit_audio(job, chunk)
            assert job.done is not None
            audio_ms = job.decoder.emitted * FRAME_MS if job.decoder is not None else 0.0
            if h.cancelled.is_set():
                done = replace(job.done, status="cancelled", reason=h.cancel_reason, audio_ms=audio_ms)
            else:
                done = replace(job.done, audio_ms=audio_ms)
            h.events.put(done)
            h.done.set()
            job.decoder = None
        return quit_now

    def _emit_audio(self, job: _Job, chunk: np.ndarray) -> None:
        h = job.handle
        assert job.decoder is not None
        start_ms = (job.decoder.emitted * SAMPLES_PER_FRAME - chunk.size) / SNAC_SAMPLE_RATE * 1000
        h.events.put(AudioChunk(h.response_id, h.item_id, job.audio_seq, start_ms, to_pcm16(chunk).tobytes()))
        job.audio_seq += 1
