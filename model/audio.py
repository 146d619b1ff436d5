"""Audio input: files to 16 kHz mono float, Whisper log-mel, and the Whisper encoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from torch import nn
from whisper.audio import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
from whisper.model import AudioEncoder, ModelDimensions

from .config import WHISPER_WINDOWS
from .errors import CheckpointError, InputError

SAMPLE_RATE = 16000
MAX_INPUT_SECONDS = 30.0
FEATURE_FRAME_MS = 20  # one Whisper encoder frame
MAX_FEATURE_FRAMES = 1500


def to_mono_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """(n,) or (n, channels) float audio at any rate -> (n',) float32 at 16 kHz."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return audio


def load_audio_file(path: str | Path, max_seconds: float = MAX_INPUT_SECONDS) -> np.ndarray:
    """Read a sound file of any common rate/channel count as 16 kHz mono float32.

    16-bit input gives int16 / 32768 exactly, as `whisper.load_audio` does.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input audio {path} does not exist")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises several types for bad files
        raise InputError(f"input audio {path} cannot be read: {e}") from None
    audio = to_mono_16k(data, int(rate))
    check_input_audio(audio, max_seconds, name=str(path))
    return audio


def check_input_audio(audio: np.ndarray, max_seconds: float = MAX_INPUT_SECONDS, name: str = "input audio") -> None:
    if audio.size == 0:
        raise InputError(f"{name} is empty")
    seconds = audio.size / SAMPLE_RATE
    if seconds > max_seconds:
        raise InputError(f"{name} is {seconds:.2f} s long; the model hears at most {max_seconds:.0f} s")


def feature_frames(num_samples: int) -> int:
    """Encoder frames the prompt keeps for audio of this length: int(ms / 20) + 1, at most 1500."""
    duration_ms = num_samples / SAMPLE_RATE * 1000
    return min(int(duration_ms / FEATURE_FRAME_MS) + 1, MAX_FEATURE_FRAMES)


def log_mel(audio: np.ndarray, n_mels: int = 80, frames: int = N_FRAMES) -> torch.Tensor:
    """16 kHz float audio -> (n_mels, frames): the first `frames` frames of the log-mel of the
    audio padded to 30 s (all 3000 by default)."""
    samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    # Frame t reads samples up to t * HOP + N_FFT / 2 and the floor (max - 8) comes from the
    # loudest frame: when the audio ends within `frames`, padding it with zeros to one FFT past
    # the last frame gives exactly the 30 s log-mel's frames, at 1/15 the cost for a 2 s turn.
    n = N_SAMPLES if samples.numel() > frames * HOP_LENGTH else min(frames * HOP_LENGTH + N_FFT, N_SAMPLES)
    return log_mel_spectrogram(pad_or_trim(samples, n), n_mels=n_mels)[:, :frames]


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int


class WhisperEncoder(nn.Module):
    """openai-whisper's AudioEncoder alone (the decoder is never used)."""

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        )

    @property
    def feature_dim(self) -> int:
        return self.dims.n_audio_state

    def cast_(self, dtype: torch.dtype) -> WhisperEncoder:
        """Matmul weights to `dtype`; LayerNorms stay fp32 (openai-whisper normalizes in fp32)."""
        with torch.no_grad():
            for module in self.encoder.modules():
                if isinstance(module, (nn.Linear, nn.Conv1d)):
                    module.to(dtype)
        return self

    @classmethod
    def from_file(cls, path: Path) -> WhisperEncoder:
        """Load the encoder from an openai-whisper checkpoint file ({"dims", "model_state_dict"})."""
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable torch file: {e}") from None
        if not isinstance(blob, dict) or "dims" not in blob or "model_state_dict" not in blob:
            raise CheckpointError(f"{path} is not an openai-whisper checkpoint (needs 'dims' and 'model_state_dict')")
        try:
            full = ModelDimensions(**blob["dims"])
        except TypeError as e:
            raise CheckpointError(f"{path}: bad 'dims': {e}") from None
        dims = WhisperDims(full.n_mels, full.n_audio_ctx, full.n_audio_state, full.n_audio_head, full.n_audio_layer)
        enc = cls(dims)
        prefix = "encoder."
        sd = {k[len(prefix) :]: v for k, v in blob["model_state_dict"].items() if k.startswith(prefix)}
        missing, unexpected = enc.encoder.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: encoder weights do not match dims (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        enc.encoder.float()
        return enc.eval()

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """mel (B, n_mels, 2T), T <= 1500 -> features (B, T, n_audio_state), or of the first
        `keep` frames only.

        openai-whisper's AudioEncoder.forward, op for op, except that the positional embedding
        is sliced to T instead of asserting T = 1500 (the 30 s window gives the same numbers),
        and that with `keep` the last block computes only the rows kept: every earlier block's
        rows are the last one's keys and values, but its own other rows feed nothing (a 2 s
        turn keeps 100 of 1500, so most of a block's work is skipped; values are unchanged).
        """
        enc = self.encoder
        p = enc.conv1.weight
        x = mel.to(device=p.device, dtype=p.dtype)
        x = F.gelu(enc.conv1(x))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)  # (B, T, C)
        x = (x + enc.positional_embedding[: x.shape[1]]).to(x.dtype)
        blocks = list(enc.blocks)
        if keep is None or keep >= x.shape[1] or not blocks:
            for block in blocks:
                x = block(x)
            return enc.ln_post(x[:, :keep]).float()
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        h = last.attn_ln(x)
        # queries from the kept rows, keys and values from all (Whisper's cross-attention path)
        x = x[:, :keep] + last.attn(h[:, :keep], xa=h)[0]
        x = x + last.mlp(last.mlp_ln(x))
        return enc.ln_post(x).float()

    def encode(self, audio: np.ndarray, window: str = "padded") -> torch.Tensor:
        """16 kHz audio -> (L, C) features of its first L frames (L from the unpadded length).

        window "padded" encodes the 30 s window (exact); "trimmed" encodes L + 1 frames (the
        extra one gives frame L - 1 its real right neighbour in the stride-2 convolution).
        """
        if window not in WHISPER_WINDOWS:
            raise InputError(f"whisper window must be one of {', '.join(WHISPER_WINDOWS)}, got {window!r}")
        n = feature_frames(audio.size)
        frames = N_FRAMES if window == "padded" else min(2 * (n + 1), N_FRAMES)
        mel = log_mel(audio, self.dims.n_mels, frames)[None]
        return self.forward(mel, keep=n)[0]
