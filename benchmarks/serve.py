"""`omnivox bench serve`: N concurrent scripted voice clients against the realtime server.

Each client streams the question fixture at real-time pace (20 ms chunks) over loopback,
waits for the answer and records: time to first audio (from the last loud sample of the
question to the first audio delta received), the playback stall (how far audio ever fell
behind continuous playback started at the first delta; 0 = no underrun), audio seconds,
and errors. A level of concurrency "stays real-time" when no client stalls more than
`stall_tolerance_ms`. Everything is bounded: client count, answer length, wall time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.audio import load_audio_file

from .latency import pcm16_exact, speech_end
from .machine import machine_info, rss_mb

CHUNK_MS = 20


async def _client(url: str, audio16: np.ndarray, end_sample: int, timeout_s: float) -> dict[str, Any]:
    import websockets

    out: dict[str, Any] = {"ttfa_ms": None, "stall_ms": None, "audio_s": 0.0, "errors": [], "status": None}
    chunk = 16000 * CHUNK_MS // 1000
    pcm = pcm16_exact(audio16)
    try:
        async with websockets.connect(url, max_size=None, open_timeout=30) as ws:
            json.loads(await ws.recv())  # session.created
            audio_cfg = {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": audio_cfg}}))
            t0 = time.monotonic()
            t_speech_end = t0 + end_sample / 16000  # real-time pace: sample i goes out at t0 + i / 16000

            async def speak() -> None:
                for i in range(0, audio16.size, chunk):
                    data = base64.b64encode(pcm[2 * i : 2 * (i + chunk)]).decode()
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": data}))
                    await asyncio.sleep(max(0.0, t0 + (i + chunk) / 16000 - time.monotonic()))

            speaker = asyncio.create_task(speak())
            first = None
            stall = 0.0
            audio_s = 0.0
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                msg = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
                now = time.monotonic()
                ev = json.loads(msg)
                kind = ev["type"]
                if kind == "response.output_audio.delta":
                    if first is None:
                        first = now
                        out["ttfa_ms"] = round((now - t_speech_end) * 1000, 1)
                    stall = max(stall, now - (first + audio_s))  # > 0: this chunk came after it was due
                    audio_s += len(base64.b64decode(ev["delta"])) / 2 / 24000
                elif kind == "error":
                    out["errors"].append(ev["error"]["code"])
                elif kind == "response.done":
                    out["status"] = ev["response"]["status"]
                    break
            await speaker
            out["stall_ms"] = round(stall * 1000, 1)
            out["audio_s"] = round(audio_s, 3)
    except Exception as e:
        out["errors"].append(f"{type(e).__name__}: {e}")
    return out


async def _level(url: str, n: int, audio: np.ndarray, end_sample: int, timeout_s: float) -> list[dict[str, Any]]:
    return await asyncio.gather(*(_client(url, audio, end_sample, timeout_s) for _ in range(n)))


def bench_serve(
    checkpoint: str | Path,
    question_wav: Path,
    *,
    levels: tuple[int, ...] = (1, 2, 4, 8),
    dtype: str = "float32",
    max_new_tokens: int = 300,
    stall_tolerance_ms: float = 150.0,
    timeout_s: float = 120.0,
    url: str | None = None,
) -> dict[str, Any]:
    from server.serve import build_engine, start_in_thread
    from server.settings import ServerSettings

    server = engine = thread = None
    if url is None:
        settings = ServerSettings(port=0, checkpoint_dir=Path(checkpoint), dtype=dtype, max_sessions=max(levels),
                                  max_new_tokens=max_new_tokens, log_level="warning")  # fmt: skip
        engine = build_engine(settings)
        server, thread, port = start_in_thread(engine)
        url = f"ws://127.0.0.1:{port}/v1/realtime"
    audio = load_audio_file(question_wav)
    audio = np.concatenate([np.zeros(4800, np.float32), audio, np.zeros(16000, np.float32)])
    speech_end_at = speech_end(audio)
    rows = []
    try:
        for n in levels:
            clients = asyncio.run(_level(url, n, audio, speech_end_at, timeout_s))
            ttfa = sorted(c["ttfa_ms"] for c in clients if c["ttfa_ms"] is not None)
            stalls = [c["stall_ms"] for c in clients if c["stall_ms"] is not None]
            errors = [e for c in clients for e in c["errors"]]
            rows.append({
                "sessions": n,
                "ttfa_p50_ms": round(statistics.median(ttfa), 1) if ttfa else None,
                "ttfa_p95_ms": round(ttfa[min(len(ttfa) - 1, int(0.95 * len(ttfa)))], 1) if ttfa else None,
                "max_stall_ms": max(stalls) if stalls else None,
                "audio_s_per_session": round(statistics.mean(c["audio_s"] for c in clients), 2),
                "errors": errors,
                "completed": sum(c["status"] == "completed" for c in clients),
                "real_time": bool(stalls) and len(stalls) == n and max(stalls) <= stall_tolerance_ms and not errors,
                "server_rss_mb": round(rss_mb(), 1) if server is not None else None,
            })  # fmt: skip
            print(json.dumps(rows[-1]))
    finally:
        if server is not None and engine is not None and thread is not None:
            server.should_exit = True
            thread.join(15)
            engine.close()
    real_time = [r["sessions"] for r in rows if r["real_time"]]
    return {
        "benchmark": "serve",
        "checkpoint": str(checkpoint),
        "dtype": dtype,
        "stall_tolerance_ms": stall_tolerance_ms,
        "levels": rows,
        "max_real_time_sessions": max(real_time) if real_time else 0,
        "machine": machine_info(),
    }
