"""`--dtype auto` on a CPU: time the candidate precisions on this host and pick by the figures.

Which precision is fastest is a property of the host's kernels, not of its feature flags: on
one 2-core Intel Xeon with avx512_bf16, bf16 decoded no faster than fp32 and its prefill was
slower, while on an AMD EPYC with the same flag bf16 was 4x fp32. So the probe times what a
decode step does most: the matmuls of a few decoder layers with the model's own shapes, at two
rows (the A1->A2 batch), with random weights in each candidate's form. Enough layers that the
weights do not fit in cache (a step is memory-bound), a bounded number of rounds (about a
second in all), candidates taking turns so a noisy neighbour hits them alike.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .llm import MANY_ROWS_MODES, QUANTIZED, Int8Linear

log = logging.getLogger(__name__)

# The precisions `auto` may pick on a CPU, most exact first: the ones whose agreement with fp32
# the README defends for a default (int4 is opt-in: README, Precision).
AUTO_CANDIDATES = ("float32", "bfloat16", "int8")
# A more exact precision within this factor of the fastest one wins: fidelity for ~equal speed.
NEAR_TIE = 1.10
# int4: half a byte plus a bf16 scale and offset per 32 weights
BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.625}


@dataclass(frozen=True)
class ProbeResult:
    choice: str
    reason: str
    ms_per_step: dict[str, float]  # the decoder layers' matmuls of one 2-row step, estimated
    threads: int
    layers_timed: int
    seconds: float
    rounds: int

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "seconds": round(self.seconds, 3)}


def _pick(ms: dict[str, float], order: Sequence[str]) -> tuple[str, str]:
    """(choice, fastest): the fastest of `order`'s timed entries, unless an earlier (more
    exact) one is within NEAR_TIE of it."""
    timed = [p for p in order if p in ms]
    if not timed:
        raise ValueError("no candidate was timed")
    fastest = min(timed, key=lambda p: ms[p])
    return next(p for p in timed if ms[p] <= ms[fastest] * NEAR_TIE), fastest


def _figures(ms: dict[str, float], order: Sequence[str]) -> str:
    return ", ".join(f"{p} {ms[p]:.1f} ms" for p in order if p in ms)


def pick_precision(ms_per_step: dict[str, float], order: Sequence[str] = AUTO_CANDIDATES) -> tuple[str, str]:
    """The fastest candidate, unless a more exact one (earlier in `order`) is within NEAR_TIE."""
    choice, fastest = _pick(ms_per_step, order)
    figures = _figures(ms_per_step, order)
    if choice == fastest:
        return choice, f"fastest on this host ({figures} per step's layer matmuls)"
    return choice, (
        f"within {round((NEAR_TIE - 1) * 100)}% of the fastest ({fastest}) and more exact "
        f"({figures} per step's layer matmuls)"
    )


def _time_in_turns(
    runs: Mapping[str, Callable[[], object]], rounds: int, budget_s: float, t0: float
) -> tuple[dict[str, float], int]:
    """Each run once untimed (first-call allocations, kernel selection), then rounds in which
    they take turns, so a noisy neighbour hits them alike, until `rounds` rounds or `budget_s`
    since `t0` (at least one round) -> (median ms per run, rounds done)."""
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {k: [] for k in runs}
    done = 0
    while done < rounds and (done == 0 or time.perf_counter() - t0 < budget_s):
        for k, run in runs.items():
            t = time.perf_counter()
            run()
            samples[k].append((time.perf_counter() - t) * 1000)
        done += 1
    return {k: statistics.median(v) for k, v in samples.items()}, done


def _layer_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's Linears, as model/llm.py holds them."""
    e, i, hs = cfg.n_embd, cfg.intermediate_size, cfg.head_size
    kv = cfg.n_query_groups * hs
    return [(cfg.n_head * hs, e), (kv, e), (kv, e), (e, cfg.n_head * hs), (i, e), (i, e), (e, i)]


def _build(precision: str, weights: list[torch.Tensor]) -> Callable[[dict[int, torch.Tensor]], None]:
    """A run over `weights` in `precision`, given inputs keyed by their width."""
    if precision == "float32":
        mats = weights
    elif precision == "bfloat16":
        mats = [w.to(torch.bfloat16) for w in weights]
    elif precision in QUANTIZED:
        layers = [QUANTIZED[precision](w, None) for w in weights]

        def run_quant(xs: dict[int, torch.Tensor]) -> None:
            for layer in layers:
                layer(xs[layer.in_features])

        return run_quant
    else:
        raise ValueError(f"cannot probe {precision!r}")

    def run(xs: dict[int, torch.Tensor]) -> None:
        for w in mats:
            F.linear(xs[w.shape[1]], w)

    return run


@torch.inference_mode()
def probe_precisions(
    cfg: ModelConfig,
    candidates: Sequence[str] = AUTO_CANDIDATES,
    *,
    cache_bytes: int = 64 << 20,
    max_layers: int = 8,
    rounds: int = 5,
    budget_s: float = 1.5,
    seed: int = 0,
) -> ProbeResult:
    """Time `candidates` (most exact first) on the calling thread (its torch thread count is
    what it measures) and pick one (pick_precision).

    Layers: enough that the smallest candidate's weights exceed `cache_bytes` (twice a large
    L3), at most `max_layers`; the per-step figure scales to the model's n_layer. Stops after `rounds`
    rounds or once `budget_s` has passed (at least one round)."""
    t0 = time.perf_counter()
    shapes = _layer_shapes(cfg)
    per_layer = sum(o * i for o, i in shapes) * min(BYTES_PER_WEIGHT[p] for p in candidates)
    n_layers = max(1, min(max_layers, cfg.n_layer, math.ceil(cache_bytes / per_layer)))
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, i, generator=gen) * 0.02 for _ in range(n_layers) for o, i in shapes]
    builds = {p: _build(p, weights) for p in candidates}
    del weights
    x = {i: torch.randn(2, i, generator=gen) for i in {i for _, i in shapes}}
    dtypes = {p: torch.float32 if p == "float32" else torch.bfloat16 for p in builds}
    runs = {p: functools.partial(build, {i: v.to(dtypes[p]) for i, v in x.items()}) for p, build in builds.items()}
    medians, done = _time_in_turns(runs, rounds, budget_s, t0)
    scale = cfg.n_layer / n_layers
    ms = {p: round(m * scale, 2) for p, m in medians.items()}
    choice, reason = pick_precision(ms, list(candidates))
    result = ProbeResult(choice, reason, ms, torch.get_num_threads(), n_layers, time.perf_counter() - t0, done)
    log.info("dtype auto: %s, %s; probe took %.2f s on %d threads", choice, reason, result.seconds, result.threads)
    return result


# Many-row work, most exact first: how an int8 Linear runs a prefill (MANY_ROWS_MODES), and
# the dtype of the encoders' (Whisper's, SNAC's) matmuls. bf16 rounds, so it must be faster.
MANY_ROWS_ORDER = ("gemm-fp32", "kernel", "gemm-bf16")
ENCODER_ORDER = ("float32", "bfloat16")


@dataclass(frozen=True)
class ManyRowsProbe:
    many_rows: str  # how the quantized LLM's int8 Linears compute a prefill
    encoder_dtype: str  # "float32" | "bfloat16": Whisper's and SNAC's matmuls
    reason: str
    ms: dict[str, float]  # one MLP matrix at `rows` rows, per mode; "float32"/"bfloat16": plain GEMMs
    rows: int
    threads: int
    seconds: float
    rounds: int

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "seconds": round(self.seconds, 3)}


@torch.inference_mode()
def probe_many_rows(
    cfg: ModelConfig, *, rows: int = 96, rounds: int = 3, budget_s: float = 1.0, seed: int = 0
) -> ManyRowsProbe:
    """Time the many-row work of the quantized modes on the calling thread: one MLP-shaped
    matrix at a prefill's `rows`, as an int8 Linear in each of MANY_ROWS_MODES (dequantizing
    included) and as plain fp32 and bf16 GEMMs (what the encoders would run). The flags do not
    say which is fast: a bf16 GEMM was 5x slower than fp32 on an AVX2 host without native bf16,
    2x faster on an AVX-512 one. Stops after `rounds` rounds or once `budget_s` has passed."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cfg.intermediate_size, cfg.n_embd, generator=gen) * 0.02
    layer = Int8Linear(w, None)
    x = torch.randn(max(rows, Int8Linear.DEQUANTIZE_ROWS), cfg.n_embd, generator=gen)
    x16, w16 = x.to(torch.bfloat16), w.to(torch.bfloat16)

    def mode_run(mode: str) -> Callable[[], object]:
        def run() -> object:
            layer.many_rows = mode
            return layer(x)

        return run

    runs: dict[str, Callable[[], object]] = {m: mode_run(m) for m in MANY_ROWS_MODES}
    runs["float32"] = lambda: F.linear(x, w)
    runs["bfloat16"] = lambda: F.linear(x16, w16)
    medians, done = _time_in_turns(runs, rounds, budget_s, t0)
    ms = {k: round(m, 2) for k, m in medians.items()}
    many_rows, _ = _pick(ms, MANY_ROWS_ORDER)
    encoder, _ = _pick(ms, ENCODER_ORDER)
    reason = (
        f"one {cfg.intermediate_size}x{cfg.n_embd} matrix at {x.shape[0]} rows: "
        f"{_figures(ms, MANY_ROWS_ORDER)}; plain GEMMs {_figures(ms, ENCODER_ORDER)}"
    )
    result = ManyRowsProbe(
        many_rows, encoder, reason, ms, x.shape[0], torch.get_num_threads(), time.perf_counter() - t0, done
    )
    log.info(
        "prefill int8 matmuls: %s, encoders %s (%s); probe took %.2f s",
        many_rows, encoder, reason, result.seconds,
    )  # fmt: skip
    return result
