"""`omnivox bench decode`: prefill time, decode steps/s and real-time factor of the LLM.

One decode step makes one 85.33 ms SNAC frame, so real time is 11.72 steps/s.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from model.codec import SAMPLES_PER_FRAME, SNAC_SAMPLE_RATE
from model.omni import OmniModel
from model.probe import probe_precisions
from model.prompts import Task, build_prompt

from .machine import machine_info

REAL_TIME_STEPS_PER_S = SNAC_SAMPLE_RATE / SAMPLES_PER_FRAME  # 11.72


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
    feats = torch.randn(prompt_frames, model.config.whisper_adapter_dim, generator=gen)
    prompt = build_prompt(task, model.layout, audio_features=feats)

    prefill_ms, step_rates = [], []
    for _ in range(repeats):
        g = model.start(prompt, max_new_tokens=steps + 1, stop_rules=False)
        t1 = time.perf_counter()
        g.step()
        t2 = time.perf_counter()
        n = 0
        while g.step() is not None:
            n += 1
        t3 = time.perf_counter()
        prefill_ms.append((t2 - t1) * 1000)
        step_rates.append(n / (t3 - t2))
    sps = statistics.median(step_rates)
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
        "batch": batch,
        "prompt_positions": prompt.length,
        "decode_steps": steps,
        "repeats": repeats,
        "load_s": round(load_s, 3),
        "prefill_ms": round(statistics.median(prefill_ms), 2),
        "step_ms": round(1000 / sps, 2),
        "steps_per_s": round(sps, 2),
        "real_time_factor": round(sps / REAL_TIME_STEPS_PER_S, 3),
        "head": {k: round(v, 3) for k, v in _time_head(model, batch).items()},
        "machine": machine_info(device),
    }


def print_table(result: dict[str, Any]) -> None:
    cols = ["model", "dtype", "batch", "prompt_positions", "prefill_ms", "step_ms", "steps_per_s", "real_time_factor"]
    print(" | ".join(cols))
    print(" | ".join(str(result[c]) for c in cols))
    print("head ms per call:", json.dumps(result["head"]))
    auto = result["auto"]
    print(f"--dtype auto picks {auto['choice']} here: {auto['reason']}")
    m = result["machine"]
    print(f"machine: {m['cpu_model']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, {m['device']}")
