"""`omnivox bench decode`: prefill time, decode steps/s and real-time factor of the LLM.

One decode step makes one 85.33 ms SNAC frame, so real time is 11.72 steps/s.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.codec import SAMPLES_PER_FRAME, SNAC_SAMPLE_RATE
from model.decode_graph import DecodeGraph
from model.decoding import step_batch
from model.llm import CacheRows
from model.omni import OmniModel
from model.probe import probe_precisions
from model.prompts import Task, build_prompt

from .machine import machine_info

REAL_TIME_STEPS_PER_S = SNAC_SAMPLE_RATE / SAMPLES_PER_FRAME  # 11.72


class CallEach(DecodeGraph):
    """A graph that steps responses with a call each, as before they shared one call (KVArena):
    the same session, for figures side by side."""

    def __init__(self, graph: DecodeGraph) -> None:
        self.__dict__.update(graph.__dict__)

    def step_groups(self, x: torch.Tensor, groups: Sequence[CacheRows]) -> torch.Tensor:
        return self.step_each(x, groups)


def _time_head(model: OmniModel, rows: int, repeats: int = 20) -> dict[str, float]:
    """ms per call of the full 181k-row head vs the slices a step actually needs."""
    llm = model.llm
    h = torch.randn(rows, model.config.n_embd, dtype=llm.dtype, device=llm.device)

    def per_call(fn: Any) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats * 1000

    with torch.inference_mode():
        return {
            "full_head_ms": per_call(lambda: llm.full_logits(h)),
            "audio_slices_ms": per_call(lambda: llm.audio_logits(h[:1])),
            "text_slice_ms": per_call(lambda: llm.text_logits(h[-1:])),
        }


def bench_decode(
    checkpoint: str | Path,
    *,
    dtype: str = "float32",
    batch: int = 2,
    responses: int = 1,
    steps: int = 64,
    prompt_frames: int = 100,
    repeats: int = 3,
    device: str = "cpu",
) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = OmniModel.load(checkpoint, device=device, dtype=dtype, with_whisper=False, with_snac=False)
    load_s = time.perf_counter() - t0
    task = Task.A1A2 if batch == 2 else Task.A1A2_SINGLE
    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(prompt_frames, model.config.whisper_adapter_dim, generator=gen) for _ in range(responses)]
    prompts = [build_prompt(task, model.layout, audio_features=f) for f in features]

    # int8/int4 with the decode graph: its steps and torch's side by side, rounds interleaved; with
    # several responses also a graph call each (graph-each) against one for all (graph).
    graph = model.llm.decode_graph
    paths: dict[str, Any] = {"torch": None}
    if graph is not None:
        paths = {"graph": graph, **({"graph-each": CallEach(graph)} if responses > 1 else {}), **paths}
    prefill_ms: dict[str, list[float]] = {p: [] for p in paths}
    step_rates: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(repeats):
        for path, attached in paths.items():
            model.llm.decode_graph = attached
            gens = [model.start(p, max_new_tokens=steps + 1, stop_rules=False) for p in prompts]
            t1 = time.perf_counter()
            step_batch(gens)
            t2 = time.perf_counter()
            n = 0
            while any(out is not None for out in step_batch(gens)):
                n += 1
            t3 = time.perf_counter()
            prefill_ms[path].append((t2 - t1) * 1000)
            step_rates[path].append(n / (t3 - t2))  # each response's steps per second
    model.llm.decode_graph = graph
    by_path = {
        p: {
            "prefill_ms": round(statistics.median(prefill_ms[p]), 2),
            "step_ms": round(1000 / statistics.median(step_rates[p]), 2),
            "steps_per_s": round(statistics.median(step_rates[p]), 2),
        }
        for p in paths
    }
    main = next(iter(paths))  # what the model runs by default
    sps = by_path[main]["steps_per_s"]
    # What `--dtype auto` picks on this host and why: the load's own probe, else one run now.
    probe = model.auto_probe
    if probe is None and device.startswith("cpu"):
        probe = probe_precisions(model.config)
    return {
        "benchmark": "decode",
        "checkpoint": str(checkpoint),
        "model": model.config.name,
        "dtype": dtype,
        "precision": model.precision,
        "auto": probe.as_json() if probe is not None else {"choice": "bfloat16", "reason": "CUDA"},
        # a quantized mode's prefill matmuls and encoder dtype, as the load's probe chose them
        "many_rows": model.many_rows_probe.as_json() if model.many_rows_probe is not None else None,
        "batch": batch,
        "responses": responses,
        "prompt_positions": prompts[0].length,
        "decode_steps": steps,
        "repeats": repeats,
        "load_s": round(load_s, 3),
        "decode_path": main,
        "prefill_ms": by_path[main]["prefill_ms"],
        "step_ms": by_path[main]["step_ms"],
        "steps_per_s": sps,
        "real_time_factor": round(sps / REAL_TIME_STEPS_PER_S, 3),
        "paths": by_path,
        "head": {k: round(v, 3) for k, v in _time_head(model, batch).items()},
        "machine": machine_info(device),
    }


def print_table(result: dict[str, Any]) -> None:
    cols = [
        "model", "dtype", "decode_path", "batch", "responses", "prompt_positions", "prefill_ms", "step_ms",
        "steps_per_s", "real_time_factor",
    ]  # fmt: skip
    print(" | ".join(cols))
    print(" | ".join(str(result[c]) for c in cols))
    if len(result["paths"]) > 1:
        print("decode paths side by side:", json.dumps(result["paths"]))
    print("head ms per call:", json.dumps(result["head"]))
    auto = result["auto"]
    print(f"--dtype auto picks {auto['choice']} here: {auto['reason']}")
    if result["many_rows"] is not None:
        rows = result["many_rows"]
        print(f"prefill int8 matmuls {rows['many_rows']}, encoders {rows['encoder_dtype']}: {rows['reason']}")
    m = result["machine"]
    print(f"machine: {m['cpu_model']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, {m['device']}")
