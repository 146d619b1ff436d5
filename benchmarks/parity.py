"""Compare our tokens and audio with upstream Mini-Omni's on the same checkpoint and inputs.

The upstream side is produced outside this repository (upstream code is never part of
omnivox): a harness runs gpt-omni/mini-omni's own generate functions and writes JSON with
each task's raw per-step token lists (7 audio layers incl. the prefill token, then text;
or the text list for text-only tasks) and the float WAV of its one-shot SNAC decode.

    python -m benchmarks.parity --upstream-json U.json --checkpoint-dir CKPT \
        --input-wav Q.wav --input-text "What is your name?" [--wav-dir DIR] [--json OUT]

A Mini-Omni2 harness (gpt-omni/mini-omni2's image + audio path) writes instead its
`list_output` (7 audio token lists + the text list, as its generate loop built them) and
`stop`; compare it with `--input-image IMG` on the same Mini-Omni2 checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from model.audio import load_audio_file
from model.omni import OmniModel
from model.prompts import Task
from model.vision import open_image_file

# upstream task name -> ours
UPSTREAM_TASKS = {
    "A1A2": Task.A1A2_SINGLE,  # upstream generate_AA: one row
    "AA-BATCH": Task.A1A2,  # generate_TA_BATCH: the two-row batch the server serves
    "STREAM": Task.A1A2,  # run_AT_batch_stream: same tokens as the batch
    "AT": Task.A1T2,
    "ASR": Task.A1T1,
    "T1A2": Task.T1A2,
    "T1T2": Task.T1T2,
}


def our_steps(model: OmniModel, task: Task, audio: np.ndarray, text: str) -> tuple[list[list[int]], Any]:
    prompt = model.prompt(task, audio=audio if task.audio_in else None, text=None if task.audio_in else text)
    result = model.start(prompt).run()
    if task.audio_out:
        return [*result.audio_steps.tolist(), result.text_steps], result
    return [result.text_steps], result


def compare(upstream: dict[str, Any], model: OmniModel, audio: np.ndarray, text: str, wav_dir: Path | None) -> dict:
    report: dict[str, Any] = {}
    for name, entry in upstream["tasks"].items():
        if name not in UPSTREAM_TASKS or entry.get("status") != "ok":
            report[name] = {"skipped": entry.get("error", "not a known task")}
            continue
        task = UPSTREAM_TASKS[name]
        ours, result = our_steps(model, task, audio, text)
        theirs = entry["tokens"] if task.audio_out else [entry["tokens"]]
        identical = ours == theirs
        first_diff = None
        if not identical:
            for s, (a, b) in enumerate(zip(ours, theirs, strict=False)):
                if a != b:
                    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                    first_diff = {"stream": s, "step": k, "ours_len": len(a), "theirs_len": len(b)}
                    break
        row: dict[str, Any] = {
            "task": task.value,
            "steps": result.num_steps,
            "stop": result.stop,
            "tokens_identical": identical,
            "first_difference": first_diff,
        }
        if task.audio_out and wav_dir is not None and entry.get("wav"):
            theirs_wav, _ = sf.read(str(wav_dir / entry["wav"]), dtype="float32")
            our_wav = model.decode_frames(result.frames)
            n = min(len(theirs_wav), len(our_wav))
            row["samples"] = [len(our_wav), len(theirs_wav)]
            row["max_abs_diff_lsb"] = float(np.max(np.abs(our_wav[:n] - theirs_wav[:n])) * 32767) if n else 0.0
        report[name] = row
    return report


def compare_image(upstream: dict[str, Any], model: OmniModel, audio: np.ndarray, image: object) -> dict:
    prompt = model.prompt(Task.IMAGE_A1A2, audio=audio, image=image)
    result = model.start(prompt).run()
    ours = [*result.audio_steps.tolist(), result.text_steps]
    theirs = upstream["list_output"]
    row: dict[str, Any] = {
        "task": Task.IMAGE_A1A2.value,
        "steps": result.num_steps,
        "stop": result.stop,
        "upstream_stop": upstream.get("stop"),
        "tokens_identical": ours == theirs,
        "prompt_identical": prompt.ids.tolist() == upstream.get("prompt", {}).get("rows"),
    }
    if ours != theirs:
        row["first_difference"] = next(
            ({"stream": i, "step": k} for i, (a, b) in enumerate(zip(ours, theirs, strict=False))
             for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
            {"lengths": [len(ours[0]), len(theirs[0])]},
        )  # fmt: skip
    return {"IMAGE-AA-BATCH": row}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream-json", type=Path, required=True)
    ap.add_argument("--checkpoint-dir", type=Path, required=True)
    ap.add_argument("--input-wav", type=Path, required=True)
    ap.add_argument("--input-text", default="What is your name?")
    ap.add_argument("--input-image", type=Path, help="the image of a Mini-Omni2 harness run")
    ap.add_argument("--wav-dir", type=Path, help="folder of the upstream WAVs named in the JSON")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    upstream = json.loads(args.upstream_json.read_text())
    model = OmniModel.load(args.checkpoint_dir)
    audio = load_audio_file(args.input_wav)
    if "list_output" in upstream:
        if args.input_image is None:
            ap.error("this is a Mini-Omni2 image run: give --input-image")
        report = compare_image(upstream, model, audio, open_image_file(args.input_image))
    else:
        report = compare(upstream, model, audio, args.input_text, args.wav_dir)
    for name, row in report.items():
        print(f"{name:9s} {json.dumps(row)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = all(r.get("tokens_identical", True) and r.get("max_abs_diff_lsb", 0) <= 1.0 for r in report.values())
    print("PARITY OK" if ok else "PARITY MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
