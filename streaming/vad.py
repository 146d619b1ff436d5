"""silero-vad (its bundled ONNX model, no network) and server-VAD turn detection."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import TurnDetection

WINDOW = 512  # samples at 16 kHz = 32 ms, what silero-vad takes
CONTEXT = 64
RATE = 16000


def silero_onnx_path() -> Path:
    # find_spec does not import silero_vad (whose import sets torch to 1 thread).
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"


class SileroVAD:
    """One ONNX session, shared by every stream (each stream keeps its own state)."""

    def __init__(self, path: Path | None = None) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(path or silero_onnx_path()), sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def stream(self) -> VadStream:
        return VadStream(self)


class VadStream:
    def __init__(self, vad: SileroVAD) -> None:
        self.vad = vad
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros((1, CONTEXT), np.float32)

    def prob(self, window: np.ndarray) -> float:
        """Speech probability of one 512-sample 16 kHz window."""
        x = np.concatenate([self.context, window.reshape(1, WINDOW).astype(np.float32)], axis=1)
        out, self.state = self.vad.session.run(
            None, {"input": x, "state": self.state, "sr": np.array(RATE, dtype=np.int64)}
        )
        self.context = x[:, -CONTEXT:]
        return float(out.reshape(-1)[0])


@dataclass(frozen=True)
class VadEdge:
    # "start" | "stop" | "score" (semantic_vad: score the turn up to `sample`) | "pause" (a
    # silence began at `sample` and lasted pause_ms: the turn may end there) | "resume" (the
    # speech after a "pause" went on)
    kind: str
    sample: int  # absolute 16 kHz sample index of the edge
    pause: int = 0  # "score": the pause the score is for (a later pause makes it stale)


class TurnDetector:
    """Speech starts at the first window with p >= threshold; it stops once p has stayed
    below threshold - 0.15 (silero's hysteresis) for silence_duration_ms. The stop edge is
    placed where the silence began.

    semantic_vad: after `semantic_silence_ms` of silence, a "score" edge asks for the
    end-of-turn model's p(complete) of the turn so far (with that short silence: what Smart
    Turn is trained on); `scored` hands it in: complete -> the turn ends there; incomplete ->
    the pause may last up to the eagerness limit (also the limit while the score is out).
    Without an end-of-turn model (has_scorer False), the server_vad default (500 ms) applies.

    `pause_ms` (None: off): once a silence has lasted that long, a "pause" edge at its start
    lets the caller begin the answer speculatively (the stop edge, if it comes, is at the same
    sample); a "resume" edge says the speech went on after it."""

    FALLBACK_SILENCE_MS = 500

    def __init__(self, cfg: TurnDetection, has_scorer: bool = False, pause_ms: int | None = None) -> None:
        self.cfg = cfg
        self.has_scorer = has_scorer
        self.pause_ms = pause_ms
        self._paused = False  # this silence's "pause" edge went out
        self.speaking = False
        self.silence_start: int | None = None
        self._limit_ms: int | None = None  # semantic: the silence that ends this pause, once scored
        self._asked = False  # semantic: this pause's score was asked for
        self.pause = 0  # counts pauses: a score for an earlier one is stale
        self._now = 0  # end of the last window seen
        self.last_score: float | None = None

    def reset(self) -> None:
        self.speaking = False
        self._new_pause(None)

    def _new_pause(self, start: int | None) -> None:
        self.silence_start = start
        self._paused = False
        self._limit_ms = None
        self._asked = False
        self.pause += 1

    def _silence_limit_ms(self) -> int:
        cfg = self.cfg
        if not cfg.semantic:
            return cfg.silence_duration_ms
        if not self.has_scorer:
            return self.FALLBACK_SILENCE_MS
        if self._limit_ms is not None:
            return self._limit_ms
        return cfg.max_wait_ms if self._asked else cfg.semantic_silence_ms

    def update(self, prob: float, window_start: int) -> VadEdge | None:
        self._now = window_start + WINDOW
        if not self.speaking:
            if prob >= self.cfg.threshold:
                self.speaking = True
                self._new_pause(None)
                return VadEdge("start", window_start)
            return None
        if prob >= self.cfg.threshold - 0.15:
            resumed = self._paused
            if self.silence_start is not None:
                self._new_pause(None)
            return VadEdge("resume", window_start) if resumed else None
        if self.silence_start is None:
            self._new_pause(window_start)
        edge = self._check()
        if edge is None and self.pause_ms is not None and not self._paused and self.silence_start is not None:
            if (self._now - self.silence_start) * 1000 / RATE >= self.pause_ms:
                self._paused = True
                return VadEdge("pause", self.silence_start, self.pause)
        return edge

    def _check(self) -> VadEdge | None:
        assert self.silence_start is not None
        silent_ms = (self._now - self.silence_start) * 1000 / RATE
        if silent_ms < self._silence_limit_ms():
            return None
        if self.cfg.semantic and self.has_scorer and self._limit_ms is None and not self._asked:
            self._asked = True
            return VadEdge("score", self._now, self.pause)
        self.speaking = False
        edge = VadEdge("stop", self.silence_start)
        self._new_pause(None)
        return edge

    def scored(self, pause: int, p: float | None) -> VadEdge | None:
        """The end-of-turn model's verdict on pause `pause`; a stop edge when it ends the turn now."""
        if pause != self.pause or not self.speaking or self.silence_start is None:
            return None  # stale: the speech went on (or the turn ended) meanwhile
        self.last_score = p
        cfg = self.cfg
        if p is None:
            self._limit_ms = self.FALLBACK_SILENCE_MS
        else:
            self._limit_ms = cfg.semantic_silence_ms if p >= cfg.semantic_threshold else cfg.max_wait_ms
        return self._check()
