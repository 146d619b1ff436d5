"""`omnivox bench image`: what an image turn costs on a Mini-Omni2 checkpoint.

Per turn, median of `runs`: CLIP preprocessing + encode, Whisper encode, and the prefill of
the image prompt (T = L + 55 positions) next to the plain voice prompt of the same audio
(T = L + 3); then, through the model runner exactly as a session submits it, the time from
submitting the turn to the first audio chunk, for image and voice turns alike. In a live
session the VAD's end-of-turn hangover (~600 ms, see `bench latency`) comes on top.
"""

from __future__ import annotations

import queue
import statistics
import time
from pathlib import Path
from typing import Any

from model.audio import load_audio_file
from model.omni import OmniModel
from model.prompts import Task
from model.vision import open_image_file, preprocess
from streaming.events import AudioChunk, ResponseDone
from streaming.runner import ModelRunner, ResponseRequest

from .machine import machine_info


def _ms(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def _first_audio_ms(runner: ModelRunner, request: ResponseRequest, timeout_s: float = 120) -> float | None:
    t0 = time.monotonic()
    stream = runner.stream("bench", request)
    first = None
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        try:
            ev = stream.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if isinstance(ev, AudioChunk) and first is None:
            first = (time.monotonic() - t0) * 1000
            stream.cancel()  # the first chunk is all we time
        if isinstance(ev, ResponseDone):
            return first
    return first


def bench_image(
    checkpoint: str | Path, question_wav: Path, image_path: Path, *, dtype: str = "auto", runs: int = 3
) -> dict[str, Any]:
    model = OmniModel.load(checkpoint, dtype=dtype)
    if not model.takes_images:
        raise SystemExit(f"{checkpoint} is a Mini-Omni checkpoint: image turns need Mini-Omni2")
    audio = load_audio_file(question_wav)
    image = open_image_file(image_path)
    clip = model.clip
    assert clip is not None
    rows: dict[str, list[float]] = {k: [] for k in ("preprocess_ms", "clip_ms", "whisper_ms", "prefill_image_ms",
                                                     "prefill_voice_ms")}  # fmt: skip
    prompts = {
        "image": model.prompt(Task.IMAGE_A1A2, audio=audio, image=image),
        "voice": model.prompt(Task.A1A2, audio=audio),
    }

    def prefill_ms(prompt: Any) -> float:
        return _ms(lambda: model.start(prompt, max_new_tokens=1, stop_rules=False).run())[0]

    for _ in range(runs + 1):  # the first round warms up
        t_pre, pixels = _ms(lambda: preprocess(image))
        t_clip = _ms(lambda: clip(pixels[None]))[0]  # noqa: B023 (called at once)
        t_whisper = _ms(lambda: model.encode_audio(audio))[0]
        t_img, t_voice = prefill_ms(prompts["image"]), prefill_ms(prompts["voice"])
        for k, v in zip(rows, (t_pre, t_clip, t_whisper, t_img, t_voice), strict=True):
            rows[k].append(v)
    medians = {k: round(statistics.median(v[1:]), 1) for k, v in rows.items()}

    runner = ModelRunner(model).start()
    try:
        first: dict[str, list[float]] = {"image": [], "voice": []}
        for _ in range(runs):
            for kind, task in (("image", Task.IMAGE_A1A2), ("voice", Task.A1A2)):
                req = ResponseRequest(task, audio=audio, image=image if kind == "image" else None,
                                      max_new_tokens=64, stop_rules=False, max_audio_lead_ms=1e9)  # fmt: skip
                ms = _first_audio_ms(runner, req)
                if ms is not None:
                    first[kind].append(ms)
    finally:
        runner.close()
    return {
        "benchmark": "image",
        "checkpoint": str(checkpoint),
        "model": model.config.name,
        "dtype": dtype,
        "precision": model.precision,
        "runs": runs,
        "image_size": list(image.size),  # type: ignore[attr-defined]
        "prompt_positions": {k: p.length for k, p in prompts.items()},
        **medians,
        "first_audio_after_submit_ms": {k: round(statistics.median(v), 1) if v else None for k, v in first.items()},
        "machine": machine_info(),
    }


def print_image(result: dict[str, Any]) -> None:
    print(f"{result['model']} ({result['precision']}), median of {result['runs']} runs, positions "
          f"{result['prompt_positions']}:")  # fmt: skip
    for k in ("preprocess_ms", "clip_ms", "whisper_ms", "prefill_image_ms", "prefill_voice_ms"):
        print(f"  {k:18s} {result[k]:8.1f}")
    fa = result["first_audio_after_submit_ms"]
    print(f"  first audio after submit: image turn {fa['image']} ms, voice turn {fa['voice']} ms")
