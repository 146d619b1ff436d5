"""`omnivox bench pipeline`: steady-state speed of whole A1->A2 answers through the runner.

N answers are submitted at once to one model runner (Whisper encode, prefill, decode steps
and streamed SNAC decoding on its second thread, exactly as sessions use it) with the stop
rules off, so every answer is `steps` long whatever the random weights would say. For each
answer: time to the first audio chunk, the real-time factor (audio seconds made per wall
second after the first chunk), and the worst playback stall a listener starting at the
first chunk would hear (0 = never starved).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.audio import load_audio_file
from model.decode_graph import DecodeGraph
from model.omni import OmniModel
from model.prompts import Task
from streaming.config import StageThreads
from streaming.events import AudioChunk
from streaming.runner import ModelRunner, ResponseRequest

from .decode import REAL_TIME_STEPS_PER_S, CallEach
from .machine import machine_info, rss_mb


@dataclass
class _Answer:
    submitted: float = 0.0
    first: float | None = None
    end: float = 0.0
    audio_s: float = 0.0
    stall: float = 0.0
    gap: float = 0.0  # the longest wait between two of its audio chunks


def _run_level(
    runner: ModelRunner, request: ResponseRequest, n: int, steps: int, stagger_s: float | None
) -> dict[str, Any]:
    """n answers; all at once, or (stagger_s) each next one that long after the previous one's
    first audio, i.e. a new turn's encode and prefill while the earlier answers play."""
    t0 = time.monotonic()
    handles = [runner.stream("r0", request)]
    stats = [_Answer(t0)]
    deadline = t0 + 60 + steps * n
    while len(handles) < n and stagger_s is None:
        handles.append(runner.stream(f"r{len(handles)}", request))
        stats.append(_Answer(time.monotonic()))
    while time.monotonic() < deadline and not (len(handles) == n and all(h.done is not None for h in handles)):
        due = stats[-1].first
        if stagger_s is not None and due is not None and len(handles) < n and time.monotonic() >= due + stagger_s:
            handles.append(runner.stream(f"r{len(handles)}", request))
            stats.append(_Answer(time.monotonic()))
        for h, st in zip(handles, stats, strict=True):
            for ev in h.drain():
                now = time.monotonic()
                if isinstance(ev, AudioChunk):
                    if st.first is None:
                        st.first = now
                        runner.playback(h.key, now)  # a listener starts here: the lead is bounded from it
                    st.stall = max(st.stall, now - (st.first + st.audio_s))  # > 0: it came late
                    st.gap = max(st.gap, now - (st.end or now))
                    st.audio_s += len(ev.pcm) / 2 / 24000
                    st.end = now
        time.sleep(0.002)
    rtf = [st.audio_s / (st.end - st.first) for st in stats if st.first is not None and st.end > st.first]
    # one decode step = one frame: steps/s of an answer from its first chunk to its last
    sps = [r * REAL_TIME_STEPS_PER_S for r in rtf]
    firsts = [(st.first - t0) * 1000 for st in stats if st.first is not None]
    return {
        "sessions": n,
        "stagger_ms": None if stagger_s is None else round(stagger_s * 1000),
        "first_audio_ms": round(statistics.median(firsts), 1) if firsts else None,
        "real_time_factor_min": round(min(rtf), 3) if rtf else None,
        "steps_per_s_per_session": round(statistics.median(sps), 2) if sps else None,
        "steps_per_s_total": round(sum(sps), 2),
        "max_stall_ms": round(max(st.stall for st in stats) * 1000, 1),
        "max_chunk_gap_ms": round(max(st.gap for st in stats) * 1000, 1),
        # Each answer in submit order: first audio from its own submit, its worst stall.
        "first_audio_ms_each": [None if st.first is None else round((st.first - st.submitted) * 1000) for st in stats],
        "stall_ms_each": [round(st.stall * 1000) for st in stats],
        "audio_s_per_answer": round(float(np.mean([st.audio_s for st in stats])), 2),
        "rss_mb": round(rss_mb(), 1),
        "peak_rss_mb": round(rss_mb(peak=True), 1),
    }


DECODE_PATHS = ("default", "torch", "graph", "graph-each", "graph-spin")


def _decode_paths(model: OmniModel, names: tuple[str, ...]) -> dict[str, DecodeGraph | None]:
    """Each decode path asked for -> the graph the LLM runs with it (None: torch)."""
    default = model.llm.decode_graph
    out: dict[str, DecodeGraph | None] = {}
    for name in names:
        if name not in DECODE_PATHS:
            raise ValueError(f"unknown decode path {name!r} ({', '.join(DECODE_PATHS)})")
        if name.startswith("graph") and not model.llm.takes_decode_graph:
            raise ValueError(f"decode path {name} needs --dtype int8 or int4 on a CPU, got {model.precision}")
        if name == "default":
            out[name] = default
        elif name == "torch":
            out[name] = None
        elif name == "graph-spin":
            out[name] = DecodeGraph(model.llm, spinning=True)
        else:
            graph = default if default is not None and not default.spinning else DecodeGraph(model.llm)
            out[name] = graph if name == "graph" else CallEach(graph)
    return out


def bench_pipeline(
    checkpoint: str | Path,
    question_wav: Path,
    *,
    dtype: str = "auto",
    steps: int = 120,
    levels: tuple[int, ...] = (1, 2),
    max_chunk_frames: int = 8,
    stagger_ms: float | None = None,
    max_audio_lead_ms: float = 1e9,
    stage_threads: tuple[str, ...] = ("",),
    prefill_chunks: tuple[int, ...] = (64,),
    decode_paths: tuple[str, ...] = ("default",),
) -> dict[str, Any]:
    """`stage_threads`: StageThreads specs timed side by side ("" = the defaults), one runner
    each on the same model. `max_audio_lead_ms`: how far an answer may run ahead of its
    listener (the server's is 1000; unbounded by default, the throughput figure). `decode_paths`:
    default, torch, graph (int8/int4: model.decode_graph), graph-each (a graph call per response, as before
    the KVArena), graph-spin (its ORT workers spinning)."""
    model = OmniModel.load(checkpoint, dtype=dtype)
    graphs = _decode_paths(model, decode_paths)
    loaded_rss = rss_mb()
    audio = load_audio_file(question_wav)
    request = ResponseRequest(Task.A1A2, audio=audio, max_new_tokens=steps, stop_rules=False,
                              max_audio_lead_ms=max_audio_lead_ms, max_chunk_frames=max_chunk_frames)  # fmt: skip
    stagger_s = None if stagger_ms is None else stagger_ms / 1000
    rows = []
    for path, spec, prefill_chunk in itertools.product(decode_paths, stage_threads, prefill_chunks):
        model.llm.decode_graph = graphs[path]
        threads = StageThreads.parse(spec)
        runner = ModelRunner(model, threads=threads, prefill_chunk=prefill_chunk).start()
        try:
            # One short answer first (no listener, so no lead bound): oneDNN builds SNAC's kernels for
            # each window size (up to 14, ~0.5-1 s each on the full model) during a server's first answers.
            runner.stream("warm-up", replace(request, max_new_tokens=24, max_audio_lead_ms=1e9)).wait(300)
            for n in levels:
                row = {"decode_path": path, "stage_threads": threads.as_json(), "prefill_chunk": prefill_chunk,
                       **_run_level(runner, request, n, steps, stagger_s)}  # fmt: skip
                rows.append(row)
                print(row)
        finally:
            runner.close()
    return {"benchmark": "pipeline", "checkpoint": str(checkpoint), "dtype": dtype, "precision": model.precision,
            "steps": steps, "max_audio_lead_ms": max_audio_lead_ms,
            "max_chunk_frames": max_chunk_frames, "loaded_rss_mb": round(loaded_rss, 1), "levels": rows,
            "machine": machine_info()}  # fmt: skip
