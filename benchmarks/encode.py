"""`omnivox bench encode`: Whisper encode time per precision and window, and the feature error
against the exact encode (fp32, 30 s padded window) on the frames the prompt keeps.

The features measured are the adapter's inputs: the first L = int(ms / 20) + 1 encoder frames.
`whisper="tiny.en"` measures the real tiny.en encoder (benchmarks.real_whisper) instead of
the checkpoint's: the errors of the approximate modes on trained weights.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.audio import SAMPLE_RATE, WhisperEncoder, load_audio_file
from model.checkpoint import load_whisper, resolve_checkpoint
from model.config import WHISPER_WINDOWS
from model.errors import InputError
from model.llm import Int8Linear
from model.omni import cpu_flags

from .machine import machine_info
from .real_whisper import write_tiny_en_checkpoint

PRECISIONS = ("float32", "bfloat16", "int8", "int8-dynamic")
WHISPERS = ("checkpoint", "tiny.en")


def _replace_linears(whisper: WhisperEncoder, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Every Linear of Whisper's blocks (attention and MLP) replaced by make(linear)."""
    with torch.no_grad():
        for block in whisper.encoder.blocks:
            for parent in (block.attn, block.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, make(child))


def quantize_int8_(whisper: WhisperEncoder) -> WhisperEncoder:
    """Whisper's Linears as the LLM's Int8Linear (int8 weights from the fp32 ones, bf16
    activations), convolutions in bf16, LayerNorms fp32. Measured here, not used: an encode has
    >= 48 rows, so Int8Linear dequantizes for a bf16 GEMM, slower than bf16 weights and less
    accurate (README, Precision); `--dtype int8` runs Whisper in bf16."""
    _replace_linears(
        whisper,
        lambda linear: Int8Linear(linear.weight, None if linear.bias is None else linear.bias.to(torch.bfloat16)),
    )
    return whisper.cast_(torch.bfloat16)


class DynamicInt8Linear(nn.Module):
    """int8 weights (a scale per output row) times int8 activations (one scale per call, from
    the activations' range) through torch's `quantized::linear_dynamic` (fbgemm, VNNI): the
    scheme of `onnxruntime.quantization.quantize_dynamic`, which measured within 10% of it."""

    def __init__(self, linear: nn.Linear, reduce_range: bool) -> None:
        """reduce_range: 7-bit activations, which avoid int16 overflow in pre-VNNI kernels (with
        VNNI they only lose accuracy)."""
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1).clamp_min(1e-12) / 127).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated; this measures the scheme only
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(q, bias)
        self.reduce_range = reduce_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, self.reduce_range)


def quantize_dynamic_int8_(whisper: WhisperEncoder) -> WhisperEncoder:
    """Whisper's Linears as DynamicInt8Linear; convolutions, attention and norms stay fp32.
    Measured here, not used: on the real tiny.en weights its features are ~7x further from
    fp32 than bf16's (README, Whisper encode)."""
    reduce_range = not ({"avx512_vnni", "avx_vnni"} & cpu_flags())
    _replace_linears(whisper, lambda linear: DynamicInt8Linear(linear, reduce_range))
    return whisper


def load_encoder(root: Path | None, whisper: str, cache: Path) -> WhisperEncoder:
    """fp32 Whisper: the checkpoint's, or the real tiny.en written as a checkpoint under `cache`."""
    if whisper not in WHISPERS:
        raise InputError(f"whisper must be one of {', '.join(WHISPERS)}, got {whisper!r}")
    if whisper == "tiny.en":
        path = cache / "tiny.en-encoder.pt"
        return WhisperEncoder.from_file(path if path.is_file() else write_tiny_en_checkpoint(path))
    assert root is not None
    return load_whisper(root)


def build_encoder(fp32: WhisperEncoder, precision: str) -> WhisperEncoder:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    whisper = copy.deepcopy(fp32)
    if precision == "bfloat16":
        whisper.cast_(torch.bfloat16)
    elif precision == "int8":
        quantize_int8_(whisper)
    elif precision == "int8-dynamic":
        quantize_dynamic_int8_(whisper)
    return whisper


def feature_error(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """(L, C) vs (L, C): abs error relative to the reference's RMS, and per-frame cosine."""
    rms = ref.pow(2).mean().sqrt().item()
    err = (ours - ref).abs()
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    return {
        "max_rel": round(err.max().item() / rms, 5),
        "mean_rel": round(err.mean().item() / rms, 5),
        "cos_mean": round(cos.mean().item(), 6),
        "cos_min": round(cos.min().item(), 6),
    }


def bench_encode(
    checkpoint: str | Path,
    wavs: list[Path],
    *,
    precisions: tuple[str, ...] = PRECISIONS,
    windows: tuple[str, ...] = WHISPER_WINDOWS,
    repeats: int = 5,
    whisper: str = "checkpoint",
    cache: Path | None = None,
) -> dict[str, Any]:
    audios = {p.stem: load_audio_file(p) for p in wavs}
    with tempfile.TemporaryDirectory() as tmp:
        root = None if whisper == "tiny.en" else resolve_checkpoint(checkpoint)
        exact = load_encoder(root, whisper, cache or Path(tmp))
    encoders = {precision: build_encoder(exact, precision) for precision in precisions}
    refs = {name: exact.encode(audio, "padded") for name, audio in audios.items()}
    cases = [(p, w, a) for p in precisions for w in windows for a in audios]
    feats = {(p, w, a): encoders[p].encode(audios[a], w) for p, w, a in cases}  # also the warm-up
    # Round-robin: every case once per round, so load from other processes on a shared
    # machine spreads over all variants instead of landing on one.
    times: dict[tuple[str, str, str], list[float]] = {case: [] for case in cases}
    for _ in range(repeats):
        for p, w, a in cases:
            t0 = time.perf_counter()
            encoders[p].encode(audios[a], w)
            times[(p, w, a)].append((time.perf_counter() - t0) * 1000)
    rows = []
    for p, w, a in cases:
        ms = statistics.median(times[(p, w, a)])
        base = statistics.median(times[(precisions[0], windows[0], a)])
        rows.append(
            {
                "audio": a,
                "seconds": round(audios[a].size / SAMPLE_RATE, 2),
                "frames": int(feats[(p, w, a)].shape[0]),
                "precision": p,
                "window": w,
                "encode_ms": round(ms, 1),
                "encode_ms_min": round(min(times[(p, w, a)]), 1),
                f"speedup_vs_{precisions[0]}_{windows[0]}": round(base / ms, 2),
                **feature_error(feats[(p, w, a)], refs[a]),
            }
        )
    return {
        "benchmark": "encode",
        "checkpoint": str(checkpoint),
        "whisper": whisper if whisper == "tiny.en" else f"the checkpoint's ({exact.dims.n_audio_layer} layers)",
        "reference": "float32, padded (30 s window)",
        "repeats": repeats,
        "rows": rows,
        "machine": machine_info("cpu"),
    }


def print_encode(result: dict[str, Any]) -> None:
    speedup = next(k for k in result["rows"][0] if k.startswith("speedup_vs_"))
    cols = ["audio", "frames", "precision", "window", "encode_ms", "encode_ms_min", speedup,
            "max_rel", "mean_rel", "cos_mean", "cos_min"]  # fmt: skip
    print(" | ".join(cols))
    for row in result["rows"]:
        print(" | ".join(str(row[c]) for c in cols))
    m = result["machine"]
    print(f"machine: {m['cpu_model']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads")
