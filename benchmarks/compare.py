"""`omnivox bench compare`: ours vs the naive upstream-style loop, side by side in one run.

Same random full-size weights, same A1->A2 prompt, same number of steps (stop rules off):
the naive loop (benchmarks/naive.py, fp32), our decoding core in fp32 (exact: the same
greedy tokens, checked), in bf16, int8 and int4 (approximate: their agreement with fp32 is
reported as a teacher-forced top-1 match rate per stream and the relative logit error).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from model.decoding import Generation
from model.omni import OmniModel
from model.prompts import Task, build_prompt

from .decode import REAL_TIME_STEPS_PER_S
from .machine import machine_info
from .naive import naive_a1a2


def _ours(model: OmniModel, llm: Any, prompt: Any, steps: int) -> tuple[list[list[int]], float]:
    g = Generation(llm, prompt, max_new_tokens=steps, stop_rules=False)
    g.step()  # prefill, not timed
    t0 = time.perf_counter()
    while g.step() is not None:
        pass
    rate = (steps - 1) / (time.perf_counter() - t0)
    r = g.result()
    return [*r.audio_steps.tolist(), r.text_steps], rate


def _naive(model: OmniModel, prompt: Any, steps: int) -> tuple[list[list[int]], float]:
    naive_a1a2(model.llm, prompt, 1)  # warm up
    t0 = time.perf_counter()
    tokens = naive_a1a2(model.llm, prompt, steps)
    rate = steps / (time.perf_counter() - t0)  # includes the prefill: small next to `steps` steps
    return tokens, rate


@torch.inference_mode()
def _agreement(reference: Any, other: Any, prompt: Any, tokens: list[list[int]]) -> dict[str, float]:
    """Feed both models the reference's tokens (teacher forcing) and compare each step's logits."""
    lay = reference.layout
    steps = len(tokens[0])
    caches = [reference.new_cache(), other.new_cache()]
    ids = prompt.ids
    match_audio = match_text = 0
    rel_err: list[float] = []
    for s in range(steps):
        hs = []
        for k, m in enumerate((reference, other)):
            emb = m.embed(ids, prompt.splices if s == 0 else ())
            hs.append(m.hidden(emb, caches[k], 0 if s == 0 else prompt.length + s - 1)[:, -1].float())
        la = [m.audio_logits(h[:1].to(m.dtype)).float() for m, h in zip((reference, other), hs, strict=True)]
        lt = [m.text_logits(h[1:2].to(m.dtype)).float() for m, h in zip((reference, other), hs, strict=True)]
        match_audio += int((la[0].argmax(-1) == la[1].argmax(-1)).sum())
        match_text += int(lt[0].argmax(-1).item() == lt[1].argmax(-1).item())
        rel_err.append(float((la[0] - la[1]).norm() / la[0].norm()))
        nxt = torch.empty((2, 8, 1), dtype=torch.long)
        for i in range(7):
            nxt[0, i, 0] = tokens[i][s] + lay.audio_shift(i)
            nxt[1, i, 0] = lay.pad_a + lay.audio_shift(i)
        nxt[:, 7, 0] = tokens[7][s]
        ids = nxt
    return {
        "audio_top1_match": round(match_audio / (7 * steps), 4),
        "text_top1_match": round(match_text / steps, 4),
        "audio_logit_rel_error_median": round(statistics.median(rel_err), 5),
    }


def _mean_agreement(reference: Any, other: Any, cases: list[tuple[Any, list[list[int]]]]) -> dict[str, float]:
    per_case = [_agreement(reference, other, prompt, tokens) for prompt, tokens in cases]
    return {k: round(statistics.mean(c[k] for c in per_case), 5) for k in per_case[0]}


def bench_compare(
    checkpoint: str | Path, steps: int = 24, prompt_frames: int = 100, agreement_prompts: int = 3
) -> dict[str, Any]:
    """Speed on prompt 0; agreement of the approximate modes over `agreement_prompts` fixed
    prompts (Whisper-shaped features drawn with seeds 0, 1, 2, ...)."""
    model = OmniModel.load(checkpoint, with_whisper=False, with_snac=False)
    prompts = [
        build_prompt(
            Task.A1A2,
            model.layout,
            audio_features=torch.randn(
                prompt_frames, model.config.whisper_adapter_dim, generator=torch.Generator().manual_seed(seed)
            ),
        )
        for seed in range(agreement_prompts)
    ]
    prompt = prompts[0]
    approximate = {
        "ours_bf16": copy.deepcopy(model.llm).cast_parameters_(torch.bfloat16),
        "ours_int8": copy.deepcopy(model.llm).quantize_("int8"),
        "ours_int8_graph": copy.deepcopy(model.llm).quantize_("int8"),  # the same weights, steps in ORT
        "ours_int4": copy.deepcopy(model.llm).quantize_("int4"),
        "ours_int4_graph": copy.deepcopy(model.llm).quantize_("int4"),
    }

    approximate["ours_int8_graph"].attach_decode_graph()
    approximate["ours_int4_graph"].attach_decode_graph()
    naive_tokens, naive_rate = _naive(model, prompt, steps)
    fp32_tokens, fp32_rate = _ours(model, model.llm, prompt, steps)
    cases = [(prompt, fp32_tokens)] + [(p, _ours(model, model.llm, p, steps)[0]) for p in prompts[1:]]
    rows: dict[str, dict[str, Any]] = {
        "naive_fp32": {"steps_per_s": round(naive_rate, 2)},
        "ours_fp32": {"steps_per_s": round(fp32_rate, 2), "tokens_identical_to_naive": fp32_tokens == naive_tokens},
    }
    for name, llm in approximate.items():
        tokens, rate = _ours(model, llm, prompt, steps)
        same = sum(a == b for x, y in zip(fp32_tokens, tokens, strict=True) for a, b in zip(x, y, strict=True))
        rows[name] = {
            "steps_per_s": round(rate, 2),
            "free_running_token_match": round(same / (8 * steps), 4),
            **_mean_agreement(model.llm, llm, cases),
        }
    for row in rows.values():
        row["speedup_vs_naive"] = round(row["steps_per_s"] / naive_rate, 2)
        row["real_time_factor"] = round(row["steps_per_s"] / REAL_TIME_STEPS_PER_S, 3)
    return {
        "benchmark": "compare",
        "checkpoint": str(checkpoint),
        "model": model.config.name,
        "prompt_positions": prompt.length,
        "steps": steps,
        "batch": 2,
        "agreement_prompts": agreement_prompts,
        "results": rows,
        "machine": machine_info(),
    }
