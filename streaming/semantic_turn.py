"""Semantic end of turn for `semantic_vad`: Smart Turn v3.2 (pipecat-ai, BSD-2), its CPU ONNX file.

The model reads the last 8 s of the user's turn (16 kHz mono) as an 80 x 800 Whisper log-mel and
returns the probability that the utterance is complete. The preprocessing here reproduces Smart
Turn's own (pipecat's LocalSmartTurnAnalyzerV3 and the upstream smart-turn inference.py):

- keep the last 8 s; a shorter turn is zero-padded at the FRONT to exactly 8 s;
- normalise the whole 8 s window (padding included) to zero mean, unit variance, in float32,
  var + 1e-7 under the square root;
- Whisper log-mel (transformers' WhisperFeatureExtractor with chunk_length=8): n_fft 400 with a
  periodic Hann window, hop 160, centred frames with reflect padding, power spectrum, 80 Slaney
  mel filters over 0..8 kHz, log10 with floor 1e-10, the last of the 801 frames dropped, clamp
  to max - 8, then (x + 4) / 4;
- input `input_features` float32 [1, 80, 800]; output [1, 1] = sigmoid probability of complete.

The audio is the turn as the VAD hands it over: the speech plus the silence that has followed it
so far (pipecat runs the model once its VAD has heard 0.2 s of silence). Ask at that moment, not
later: the longer the trailing silence, the more everything reads as complete (pure silence gives
0.99), so an unfinished sentence can pass 0.5 after about 0.5 s of silence. The level of the audio
does not matter (it is normalised). Pure compute: no threads, no asyncio.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SmartTurnInput:
    rate: int = 16000
    seconds: int = 8
    n_fft: int = 400
    hop: int = 160
    n_mels: int = 80
    norm_eps: float = 1e-7
    mel_floor: float = 1e-10
    dynamic_range: float = 8.0  # log10 units kept below the loudest bin

    @property
    def samples(self) -> int:
        return self.rate * self.seconds  # 128000

    @property
    def frames(self) -> int:
        return self.samples // self.hop  # 800


SMART_TURN = SmartTurnInput()


def smart_turn_onnx_path() -> Path:
    # find_spec("pipecat") does not import pipecat (whose import is heavy).
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pipecat-ai package is not installed (it ships the Smart Turn v3.2 model)")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "audio" / "turn" / "smart_turn" / "data" / "smart-turn-v3.2-cpu.onnx"
    if not path.is_file():
        raise RuntimeError(f"Smart Turn model not found at {path} (pipecat-ai without its bundled model?)")
    return path


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_step = 27.0 / np.log(6.4)
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * log_step)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((mel - 15.0) * log_step))


def _mel_filters(cfg: SmartTurnInput) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular Slaney filters with area normalisation (librosa's, Whisper's)."""
    top = _hz_to_mel(np.array([0.0, cfg.rate / 2]))
    edges = _mel_to_hz(np.linspace(top[0], top[1], cfg.n_mels + 2))
    bins = np.linspace(0.0, cfg.rate // 2, cfg.n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lo) / (mid - lo)
    falling = (hi - bins[None, :]) / (hi - mid)
    tri = np.maximum(0.0, np.minimum(rising, falling))
    return tri * (2.0 / (hi - lo))


_FILTERS = _mel_filters(SMART_TURN)
_WINDOW = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(SMART_TURN.n_fft) / SMART_TURN.n_fft)  # periodic Hann


def fit_window(audio16: np.ndarray, cfg: SmartTurnInput = SMART_TURN) -> np.ndarray:
    """The last 8 s as float32, zero-padded at the front when shorter."""
    x = np.asarray(audio16, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected 1-D mono audio, got shape {x.shape}")
    x = x[-cfg.samples :]
    if x.size < cfg.samples:
        x = np.concatenate([np.zeros(cfg.samples - x.size, np.float32), x])
    return x


def log_mel(audio16: np.ndarray, cfg: SmartTurnInput = SMART_TURN) -> np.ndarray:
    """Smart Turn's input features, float32 [n_mels, frames], from the turn's 16 kHz audio."""
    x = fit_window(audio16, cfg)
    x = (x - x.mean()) / np.sqrt(x.var() + np.float32(cfg.norm_eps))  # float32, like the reference
    half = cfg.n_fft // 2
    padded = np.pad(x.astype(np.float64), half, mode="reflect")
    starts = np.arange(cfg.frames + 1) * cfg.hop
    frames = padded[starts[:, None] + np.arange(cfg.n_fft)[None, :]]  # [801, 400]
    power = np.abs(np.fft.rfft(frames * _WINDOW, axis=1)) ** 2  # [801, 201]
    mel = np.log10(np.maximum(power @ _FILTERS.T, cfg.mel_floor)).T[:, :-1]  # [80, 800]
    mel = np.maximum(mel, mel.max() - cfg.dynamic_range)
    return ((mel + 4.0) / 4.0).astype(np.float32)


class SmartTurn:
    """One ONNX session, shared by every session's turn detector (onnxruntime's run is thread-safe)."""

    def __init__(self, path: Path | None = None, threads: int = 1) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = threads
        opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(
            str(path or smart_turn_onnx_path()), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name  # "input_features"

    def probability(self, audio16: np.ndarray) -> float:
        """P(the utterance is complete) for the user's turn so far: 16 kHz mono float32 in [-1, 1],
        speech plus the silence after it. Only the last 8 s count; empty audio reads as 8 s of silence."""
        features = log_mel(audio16)[None]
        out = self.session.run(None, {self.input_name: features})[0]
        return float(np.asarray(out).reshape(-1)[0])
