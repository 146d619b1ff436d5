"""silero-vad (its bundled ONNX model, no network) and server-VAD turn detection."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
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
    kind: str  # "start" | "stop"
    sample: int  # absolute 16 kHz sample index of the edge


# Scores the turn up to a sample (now, a short silence after the speech): p(the utterance is complete),
# or None when no turn is open or no end-of-turn model is loaded.
TurnScorer = Callable[[int], "float | None"]


class TurnDetector:
    """Speech starts at the first window with p >= threshold; it stops once p has stayed
    below threshold - 0.15 (silero's hysteresis) for silence_duration_ms. The stop edge is
    placed where the silence began.

    semantic_vad: after `semantic_silence_ms` of silence, `scorer` (the end-of-turn model)
    decides: complete -> the turn ends there; incomplete -> the pause may last up to the
    eagerness limit. Without a score, the server_vad default (500 ms) applies."""

    FALLBACK_SILENCE_MS = 500

    def __init__(self, cfg: TurnDetection, scorer: TurnScorer | None = None) -> None:
        self.cfg = cfg
        self.scorer = scorer
        self.speaking = False
        self.silence_start: int | None = None
        self._limit_ms: int | None = None  # semantic: the silence that ends this pause, once scored
        self.last_score: float | None = None

    def reset(self) -> None:
        self.speaking = False
        self.silence_start = None
        self._limit_ms = None

    def _silence_limit_ms(self, silent_ms: float, now: int) -> int:
        cfg = self.cfg
        if not cfg.semantic:
            return cfg.silence_duration_ms
        if self._limit_ms is None:
            if silent_ms < cfg.semantic_silence_ms:
                return cfg.semantic_silence_ms
            # Scored once, with the short silence included (what Smart Turn is trained on): more
            # silence drifts every utterance towards "complete".
            p = self.scorer(now) if self.scorer is not None else None
            self.last_score = p
            if p is None:
                self._limit_ms = self.FALLBACK_SILENCE_MS
            else:
                self._limit_ms = cfg.semantic_silence_ms if p >= cfg.semantic_threshold else cfg.max_wait_ms
        return self._limit_ms

    def update(self, prob: float, window_start: int) -> VadEdge | None:
        if not self.speaking:
            if prob >= self.cfg.threshold:
                self.speaking = True
                self.silence_start = None
                self._limit_ms = None
                return VadEdge("start", window_start)
            return None
        if prob >= self.cfg.threshold - 0.15:
            self.silence_start = None
            self._limit_ms = None
            return None
        if self.silence_start is None:
            self.silence_start = window_start
        silent_ms = (window_start + WINDOW - self.silence_start) * 1000 / RATE
        if silent_ms >= self._silence_limit_ms(silent_ms, window_start + WINDOW):
            self.speaking = False
            edge = VadEdge("stop", self.silence_start)
            self.silence_start = None
            self._limit_ms = None
            return edge
        return None
