"""omnivox-client: talk to an omnivox (or any OpenAI-Realtime-compatible) server.

    omnivox-client question.wav --out answer.wav
    omnivox-client question.wav --barge-in stop.wav --barge-at 0.8
    omnivox-client --mic
    omnivox-client question.wav --image photo.jpg   # Mini-Omni2: ask about a picture

It streams the input at real-time pace (as a microphone would), prints the answer's
transcript as it streams with latency figures, and saves the answer audio. This file is
also the reference for wiring an assistant over the WebSocket: it uses only the protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

RATE = 24000  # the session's input and output rate (PCM16 mono)
CHUNK_S = 0.04


def load_wav(path: Path) -> np.ndarray:
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return soxr.resample(audio.mean(axis=1), rate, RATE).astype(np.float32) if rate != RATE else audio.mean(axis=1)


def to_b64(audio: np.ndarray) -> str:
    return base64.b64encode(np.clip(np.round(audio * 32767), -32768, 32767).astype("<i2").tobytes()).decode()


def speech_end_s(audio: np.ndarray) -> float:
    loud = np.flatnonzero(np.abs(audio) > 0.02)
    return (loud[-1] + 1) / RATE if loud.size else 0.0


async def stream_audio(ws: Any, audio: np.ndarray) -> float:
    """Send audio at real-time pace; returns the wall time it started."""
    t0 = time.monotonic()
    step = int(RATE * CHUNK_S)
    for i in range(0, audio.size, step):
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": to_b64(audio[i : i + step])}))
        await asyncio.sleep(max(0.0, t0 + (i + step) / RATE - time.monotonic()))
    return t0


async def mic_audio(ws: Any, stop: asyncio.Event) -> None:
    try:
        import sounddevice as sd  # optional extra: pip install omnivox[mic]
    except ImportError:
        raise SystemExit("--mic needs the sounddevice package: pip install sounddevice") from None
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=100)

    def callback(indata: np.ndarray, frames: int, t: Any, status: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, indata[:, 0].copy())

    with sd.InputStream(samplerate=RATE, channels=1, dtype="float32", blocksize=int(RATE * CHUNK_S), callback=callback):
        print("listening on the microphone; Ctrl+C to stop")
        while not stop.is_set():
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": to_b64(await queue.get())}))


async def run(args: argparse.Namespace) -> int:
    import websockets
    from websockets.exceptions import InvalidStatus

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        ws = await websockets.connect(args.url, additional_headers=headers, max_size=None, open_timeout=10)
    except InvalidStatus as e:
        code = e.response.status_code
        why = {401: "the server refused the API key (HTTP 401)", 503: "the server is full (HTTP 503); retry later"}
        print(f"omnivox-client: {why.get(code, f'the server refused the connection (HTTP {code})')}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError) as e:
        print(f"omnivox-client: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2

    answer: list[np.ndarray] = []
    stats: dict[str, Any] = {}
    async with ws:
        created = json.loads(await ws.recv())
        if created.get("session", {}).get("omnivox", {}).get("demo_checkpoint"):
            print("note: the server runs the demo checkpoint (random weights): the answer is noise")
        session: dict[str, Any] = {
            "type": "realtime", "output_modalities": ["text"] if args.text_only else ["audio"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}}}}  # fmt: skip
        if "omnivox" in created.get("session", {}):
            session["omnivox"] = {}  # an omnivox server: ask for its interrupt events and timings
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        if args.image:
            if not created.get("session", {}).get("omnivox", {}).get("images", False):
                print("note: this server's model takes no images (Mini-Omni); sending it anyway")
            # OpenAI Realtime's way: a user message with an input_image data URL, before the turn.
            content = [{"type": "input_image", "image_url": image_data_url(args.image)}]
            await ws.send(json.dumps({"type": "conversation.item.create",
                                      "item": {"type": "message", "role": "user", "content": content}}))  # fmt: skip
            print(f"sent the image {args.image}: the next turn is answered about it")
        stop = asyncio.Event()
        audio = None
        sender: asyncio.Task[Any]
        if args.mic:
            sender = asyncio.create_task(mic_audio(ws, stop))
        else:
            audio = np.concatenate([load_wav(args.wav), np.zeros(int(RATE * 1.0), np.float32)])
            print(f"sending {args.wav} ({audio.size / RATE:.1f} s) at real-time pace")
            sender = asyncio.create_task(stream_audio(ws, audio))
        barge = load_wav(args.barge_in) if args.barge_in else None
        barge_task = None
        first_audio = None
        t_start = time.monotonic()
        async for message in ws:
            if isinstance(message, bytes):
                continue
            ev = json.loads(message)
            kind = ev["type"]
            now = time.monotonic()
            if kind == "input_audio_buffer.speech_stopped":
                print(f"[{now - t_start:5.2f}s] end of your turn detected")
            elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
                print(ev["delta"], end="", flush=True)
            elif kind == "response.output_audio.delta":
                pcm = np.frombuffer(base64.b64decode(ev["delta"]), dtype="<i2")
                answer.append(pcm.astype(np.float32) / 32768)
                if first_audio is None:
                    first_audio = now
                    if audio is not None:
                        stats["ttfa_ms"] = round((now - t_start - speech_end_s(audio)) * 1000)
                    if barge is not None:
                        barge_task = asyncio.create_task(_barge_in(ws, barge, args.barge_at))
            elif kind == "omnivox.interrupt":
                print(f"\n[{now - t_start:5.2f}s] interrupted by {ev['phrase'] or 'speech'!r}")
            elif kind == "error":
                print(f"\nserver error {ev['error']['code']}: {ev['error']['message']}", file=sys.stderr)
            elif kind == "response.done":
                r = ev["response"]
                stats.update(status=r["status"], server=r.get("omnivox", {}))
                if not args.mic:
                    break
        stop.set()
        for task in (sender, barge_task):
            if task is not None:
                task.cancel()
    print()
    if stats:
        server = stats.get("server", {})
        print(f"status {stats.get('status')}; time to first audio {stats.get('ttfa_ms')} ms (client), "
              f"{server.get('ttfa_ms')} ms (server); {server.get('steps_per_s')} steps/s")  # fmt: skip
    if args.out and answer:
        sf.write(str(args.out), np.concatenate(answer), RATE, subtype="PCM_16")
        print(f"saved the answer to {args.out} ({sum(a.size for a in answer) / RATE:.2f} s)")
    return 0 if stats.get("status") in ("completed", "cancelled") else 1


IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def image_data_url(path: Path) -> str:
    mime = IMAGE_TYPES.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path}: send a PNG, JPEG or WebP image")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


async def _barge_in(ws: Any, audio: np.ndarray, after_s: float) -> None:
    await asyncio.sleep(after_s)
    print(f"\n[barge-in: sending {audio.size / RATE:.1f} s]")
    await stream_audio(ws, np.concatenate([audio, np.zeros(int(RATE * 0.8), np.float32)]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="omnivox-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("wav", nargs="?", type=Path, help="what to say (any WAV; streamed at real-time pace)")
    ap.add_argument("--url", default="ws://127.0.0.1:8000/v1/realtime", help="the server's realtime endpoint")
    ap.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    ap.add_argument("--out", type=Path, help="save the answer audio here (24 kHz WAV)")
    ap.add_argument("--mic", action="store_true", help="talk through the microphone (needs sounddevice)")
    ap.add_argument("--barge-in", type=Path, help="a WAV to say while the answer plays (e.g. 'stop omni')")
    ap.add_argument("--barge-at", type=float, default=1.0, help="seconds after the first answer audio")
    ap.add_argument("--text-only", action="store_true", help="ask for a text answer")
    ap.add_argument("--image", type=Path, help="a PNG/JPEG/WebP to ask about (Mini-Omni2 servers)")
    args = ap.parse_args(argv)
    if not args.mic and (args.wav is None or not args.wav.is_file()):
        ap.error("give a WAV file to send (or --mic)")
    if args.image is not None and (not args.image.is_file() or args.image.suffix.lower() not in IMAGE_TYPES):
        ap.error(f"--image needs an existing PNG, JPEG or WebP file, got {args.image}")
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
