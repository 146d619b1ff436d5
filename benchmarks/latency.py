"""`omnivox bench latency`: end of user speech -> first audio out, and barge-in latency.

A scripted user speaks into a real session at real-time pace (32 ms chunks), the way a
microphone would. We time, on the wall clock:
- ttfa: from the last speech sample fed to the first audio chunk out, split into the VAD
  hangover (speech end -> the end-of-turn decision), Whisper encode, prefill, the
  decode steps to the first exact SNAC chunk (7 delay steps + lookahead), and SNAC decode;
  once per turn detection mode, side by side: server_vad (500 ms of silence) and
  semantic_vad (the Smart Turn end-of-turn model after a short silence), and optionally
  with the opt-in fast start (less SNAC lookahead on the first chunk only), whose error
  against the one-shot decode is reported too;
- barge-in: from the last sample of a spoken "stop omni" to the cancel (the interrupt event);
- the response's real-time factor: audio seconds made per second of generation.
The floor is the VAD silence window plus the work for one frame.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.audio import load_audio_file
from model.codec import SAMPLES_PER_FRAME
from model.omni import OmniModel
from streaming.config import SessionConfig, TurnDetection
from streaming.detector import FasterWhisperASR, RecognizerWorker
from streaming.driver import LocalSession
from streaming.events import AudioChunk, Event, InputCommitted, Interrupted, ResponseDone
from streaming.runner import ModelRunner
from streaming.semantic_turn import SmartTurn
from streaming.vad import SileroVAD

from .machine import machine_info

CHUNK = 512  # 32 ms at 16 kHz


def pcm16_exact(audio: np.ndarray) -> bytes:
    """Float audio read from int16 back to the same PCM16 bytes (x 32768, no rescaling)."""
    return np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes()


def speech_end(audio: np.ndarray, thresh: float = 0.02) -> int:
    """Index just after the last loud sample: where the speech really ends."""
    loud = np.flatnonzero(np.abs(audio) > thresh)
    return int(loud[-1]) + 1 if loud.size else 0


def _speak(session: LocalSession, audio: np.ndarray, sink: list[tuple[float, Event]]) -> float:
    """Feed audio at real-time pace, polling events as they come; returns the start time
    (sample i is fed at start + i / 16000)."""
    t0 = time.monotonic()
    for i in range(0, audio.size, CHUNK):
        session.append_audio(pcm16_exact(audio[i : i + CHUNK]))
        now = time.monotonic()
        sink.extend((now, e) for e in session.poll())
        pause = t0 + (i + CHUNK) / 16000 - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return t0


def _wait(session: LocalSession, sink: list[tuple[float, Event]], until: type, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, e in sink:
            if isinstance(e, until):
                return t
        now = time.monotonic()
        sink.extend((now, e) for e in session.poll())
        time.sleep(0.002)
    return None


def _snac_first_chunk_ms(model: OmniModel, frames: int, repeats: int = 5) -> float:
    assert model.codec is not None
    codes = torch.randint(0, 4096, (frames, 7))
    model.codec.decode(codes)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.codec.decode(codes)
    return (time.perf_counter() - t0) / repeats * 1000


# tokens the barge-in answer may run to (~12 s of audio): it is interrupted long before
BARGE_IN_TOKENS = 150


def _label(mode: str, first_lookahead: int | None, speculate: int | None = None) -> str:
    label = mode if first_lookahead is None else f"{mode}+la{first_lookahead}"
    return label if speculate is None else f"{label}+spec{speculate}"


def fast_start_error(model: OmniModel, question: np.ndarray, cfg: SessionConfig) -> dict[str, dict[str, float]]:
    """The first chunk of an answer streamed with less lookahead, against the one-shot decode of
    the same frames (later chunks are exact: tested)."""
    from model.prompts import Task
    from streaming.audio_out import StreamingSnacDecoder

    assert model.codec is not None
    frames = model.start(model.prompt(Task.A1A2, audio=question), max_new_tokens=40, stop_rules=False).run().frames
    lookahead = cfg.lookahead_frames
    frames = frames[: max(8, lookahead + 2)]
    one_shot = model.decode_frames(frames)
    out: dict[str, dict[str, float]] = {}
    for la in range(lookahead):
        dec = StreamingSnacDecoder(model.codec, model.layout.num_codes, cfg.chunk_frames, cfg.left_context_frames,
                                   lookahead, cfg.max_chunk_frames, first_lookahead=la)  # fmt: skip
        chunks = [c for f in frames.tolist() for c in dec.push(f)]
        first = chunks[0]
        ref = one_shot[: first.size]
        err = first - ref
        snr = 10 * np.log10(float(np.sum(ref**2)) / max(float(np.sum(err**2)), 1e-20))
        out[str(la)] = {"max_rel": float(np.max(np.abs(err)) / max(float(np.max(np.abs(one_shot))), 1e-9)),
                        "snr_db": round(snr, 1)}  # fmt: skip
    return out


def bench_latency(
    checkpoint: str | Path,
    question_wav: Path,
    command_wav: Path,
    *,
    dtype: str = "float32",
    runs: int = 3,
    max_new_tokens: int = 60,
    device: str = "cpu",
    turn_detection: tuple[str, ...] = ("server_vad", "semantic_vad"),
    first_chunk_lookahead: tuple[int | None, ...] = (None,),
    speculate: tuple[int | None, ...] = (None, 160),
    decode_graph: bool = True,
) -> dict[str, Any]:
    model = OmniModel.load(checkpoint, device=device, dtype=dtype, decode_graph=decode_graph)
    runner = ModelRunner(model).start()
    vad = SileroVAD()
    turn_model = SmartTurn()
    recognizer = RecognizerWorker(FasterWhisperASR())
    question, command = load_audio_file(question_wav), load_audio_file(command_wav)
    silence = np.zeros(int(0.3 * 16000), np.float32)
    # No pacing here: the real-time factor is what generation can do, not what playback allows.
    cfg = SessionConfig(input_sample_rate=16000, max_new_tokens=max_new_tokens, max_audio_lead_ms=1e9)
    q_end, c_end = silence.size + speech_end(question), speech_end(command)
    rows: list[dict[str, Any]] = []
    start_error = fast_start_error(model, question, cfg)  # also warms the model up, untimed
    try:
        variants = [(m, la, sp) for m in turn_detection for la in first_chunk_lookahead for sp in speculate]
        for mode, la, sp in (v for _ in range(runs) for v in variants):
            # -- time to first audio
            variant = cfg.replace(turn_detection=TurnDetection(type=mode), first_chunk_lookahead_frames=la,
                                  speculate_after_ms=sp)  # fmt: skip
            s = LocalSession(runner, vad, recognizer, variant, turn_model)
            ev: list[tuple[float, Event]] = []
            t_spoken = _speak(s, np.concatenate([silence, question]), ev) + q_end / 16000
            t_commit = None
            for _ in range(40):  # the user is quiet now, and the microphone keeps streaming (<= 10 s)
                _speak(s, np.zeros(int(0.25 * 16000), np.float32), ev)
                t_commit = next((t for t, e in ev if isinstance(e, InputCommitted)), None)
                if t_commit is not None:
                    break
            t_audio = _wait(s, ev, AudioChunk, 120)
            t_done = _wait(s, ev, ResponseDone, 300)
            done = next(e for _, e in ev if isinstance(e, ResponseDone))
            first = next(t for t, e in ev if isinstance(e, AudioChunk))
            tm = done.timings
            gen_s = (t_done or first) - (t_commit or first) - (tm.get("encode_ms") or 0) / 1000
            row: dict[str, Any] = {
                "turn_detection": mode,
                "variant": _label(mode, la, sp),
                "ttfa_ms": round((t_audio - t_spoken) * 1000, 1) if t_audio else None,
                "vad_hangover_ms": round((t_commit - t_spoken) * 1000, 1) if t_commit else None,
                "encode_ms": tm.get("encode_ms"),
                "prefill_ms": tm.get("prefill_ms"),
                # speculation: how long before the end of the turn its encode + prefill were done
                "speculation_lead_ms": tm.get("speculation_lead_ms"),
                "to_first_frame_ms": tm.get("first_frame_ms"),
                "steps": tm.get("steps"),
                "response_audio_s": round(done.audio_ms / 1000, 3),
                "real_time_factor": round(done.audio_ms / 1000 / gen_s, 3) if gen_s > 0 else None,
            }
            s.close()
            rows.append(row)
            if (mode, la, sp) != variants[0]:
                continue
            # -- barge-in (once per run): a new answer, then "stop omni" while it plays
            # An answer long enough to still be playing when the command has been spoken and
            # recognized, on a slow host too (30 tokens is 2 s of audio: over before "stop omni";
            # random weights end answers within ~20 steps unless the stop rules are off).
            barge_cfg = cfg.replace(max_audio_lead_ms=1000, max_new_tokens=max(max_new_tokens, BARGE_IN_TOKENS),
                                    stop_rules=False)  # fmt: skip
            s2 = LocalSession(runner, vad, recognizer, barge_cfg)
            ev2: list[tuple[float, Event]] = []
            _speak(s2, np.concatenate([silence, question, np.zeros(int(0.7 * 16000), np.float32)]), ev2)
            if _wait(s2, ev2, AudioChunk, 120) is not None:
                t_cmd_end = _speak(s2, command, ev2) + c_end / 16000
                _speak(s2, np.zeros(int(0.6 * 16000), np.float32), ev2)
                t_int = _wait(s2, ev2, Interrupted, 10)
                row["barge_in_ms"] = round((t_int - t_cmd_end) * 1000, 1) if t_int else None
                row["barge_in_detected"] = t_int is not None
            s2.close()
    finally:
        stage_threads = runner.stage_threads()
        asr_threads = getattr(recognizer.recognizer, "threads", None)
        runner.close()
        recognizer.close()

    def values(label: str, key: str) -> list[float]:
        return [r[key] for r in rows if r["variant"] == label and r.get(key) is not None]

    def med(label: str, key: str) -> float | None:
        vals = values(label, key)
        return round(statistics.median(vals), 1) if vals else None

    def p90(label: str, key: str) -> float | None:
        vals = values(label, key)
        return round(float(np.percentile(vals, 90)), 1) if vals else None

    keys = [k for k in rows[0] if k not in ("barge_in_detected", "turn_detection", "variant")]
    labels = [_label(m, la, sp) for m, la, sp in variants]
    lookahead = cfg.lookahead_frames + cfg.chunk_frames
    return {
        "benchmark": "latency",
        "checkpoint": str(checkpoint),
        "model": model.config.name,
        "dtype": dtype,
        "decode_graph": model.llm.decode_graph is not None,
        "question_wav": str(question_wav),
        "runs": rows,
        "median": {label: {k: med(label, k) for k in keys} for label in labels},
        "p90": {label: {k: p90(label, k) for k in ("ttfa_ms", "vad_hangover_ms")} for label in labels},
        "fast_start_error": start_error,
        "snac_first_chunk_ms": round(_snac_first_chunk_ms(model, lookahead + cfg.left_context_frames), 1),
        "vad_silence_window_ms": 500,
        "frame_ms": round(SAMPLES_PER_FRAME / 24, 2),
        "machine": machine_info(device),
        # threads each stage really runs with ("machine.threads" is the main thread's count)
        "stage_threads": {
            **stage_threads,
            "vad": 1,
            "turn_model": 1,
            "asr": asr_threads,  # transcripts
            "asr_commands": getattr(recognizer.recognizer, "command_threads", None),
            "asr_lanes": recognizer.lanes,
        },
    }


def print_latency(result: dict[str, Any]) -> None:
    medians = result["median"]
    modes = list(medians)
    print(f"{result['model']} ({result['dtype']}), medians per variant:")
    print(f"  {'':18s} " + " ".join(f"{m:>14s}" for m in modes))
    for k in medians[modes[0]]:
        print(f"  {k:18s} " + " ".join(f"{medians[m][k]!s:>14s}" for m in modes))
    for k in ("ttfa_ms", "vad_hangover_ms"):
        print(f"  {k + ' p90':18s} " + " ".join(f"{result['p90'][m][k]!s:>14s}" for m in modes))
    print(f"  snac_first_chunk_ms {result['snac_first_chunk_ms']}")
    for la, err in result["fast_start_error"].items():
        print(f"  first chunk with lookahead {la}: max error {err['max_rel']:.2%} of peak, SNR {err['snr_db']} dB")
