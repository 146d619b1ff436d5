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

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .llm import QUANTIZED

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
        return {
            "choice": self.choice,
            "reason": self.reason,
            "ms_per_step": self.ms_per_step,
            "threads": self.threads,
            "layers_timed": self.layers_timed,
            "rounds": self.rounds,
            "seconds": round(self.seconds, 3),
        }


def pick_precision(ms_per_step: dict[str, float], order: Sequence[str] = AUTO_CANDIDATES) -> tuple[str, str]:
    """The fastest candidate, unless a more exact one (earlier in `order`) is within NEAR_TIE."""
    timed = [p for p in order if p in ms_per_step]
    if not timed:
        raise ValueError("no candidate was timed")
    fastest = min(timed, key=lambda p: ms_per_step[p])
    for p in timed:  # most exact first
        if ms_per_step[p] <= ms_per_step[fastest] * NEAR_TIE:
            figures = ", ".join(f"{q} {ms_per_step[q]:.1f} ms" for q in timed)
            if p == fastest:
                return p, f"fastest on this host ({figures} per step's layer matmuls)"
            return p, (
                f"within {round((NEAR_TIE - 1) * 100)}% of the fastest ({fastest}) and more exact "
                f"({figures} per step's layer matmuls)"
            )
    raise AssertionError("unreachable: the fastest is within its own tie")


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
    runs = {p: _build(p, weights) for p in candidates}
    del weights
    x = {i: torch.randn(2, i, generator=gen) for i in {i for _, i in shapes}}
    xs = {p: {i: v.to(torch.float32 if p == "float32" else torch.bfloat16) for i, v in x.items()} for p in candidates}
    for p, run in runs.items():
        run(xs[p])  # warm-up: first-call allocations and kernel selection
    samples: dict[str, list[float]] = {p: [] for p in candidates}
    done = 0
    while done < rounds and (done == 0 or time.perf_counter() - t0 < budget_s):
        for p, run in runs.items():
            t = time.perf_counter()
            run(xs[p])
            samples[p].append((time.perf_counter() - t) * 1000)
        done += 1
    scale = cfg.n_layer / n_layers
    ms = {p: round(statistics.median(s) * scale, 2) for p, s in samples.items()}
    choice, reason = pick_precision(ms, list(candidates))
    result = ProbeResult(choice, reason, ms, torch.get_num_threads(), n_layers, time.perf_counter() - t0, done)
    log.info("dtype auto: %s, %s; probe took %.2f s on %d threads", choice, reason, result.seconds, result.threads)
    return result
