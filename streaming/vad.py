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
    kind: str  # "start" | "stop"
    sample: int  # absolute 16 kHz sample index of the edge


class TurnDetector:
    """Speech starts at the first window with p >= threshold; it stops once p has stayed
    below threshold - 0.15 (silero's hysteresis) for silence_duration_ms. The stop edge is
    placed where the silence began."""

    def __init__(self, cfg: TurnDetection) -> None:
        self.cfg = cfg
        self.speaking = False
        self.silence_start: int | None = None

    def reset(self) -> None:
        self.speaking = False
        self.silence_start = None

    def update(self, prob: float, window_start: int) -> VadEdge | None:
        if not self.speaking:
            if prob >= self.cfg.threshold:
                self.speaking = True
                self.silence_start = None
                return VadEdge("start", window_start)
            return None
        if prob >= self.cfg.threshold - 0.15:
            self.silence_start = None
            return None
        if self.silence_start is None:
            self.silence_start = window_start
        if window_start + WINDOW - self.silence_start >= self.cfg.silence_duration_ms * RATE // 1000:
            self.speaking = False
            edge = VadEdge("stop", self.silence_start)
            self.silence_start = None
            return edge
        return None
