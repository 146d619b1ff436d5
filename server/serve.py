"""`omnivox serve`: load the model, build the app, run uvicorn, shut down cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import FrameType

import uvicorn

from model.omni import OmniModel

from .app import Engine, create_app, startup_warnings
from .settings import ServerSettings

log = logging.getLogger("omnivox.server")

DEMO_NOTICE = (
    "no checkpoint given: serving the embedded demo checkpoint (tiny, RANDOM weights). "
    "The whole pipeline runs, but the assistant speaks noise. Pass --checkpoint-dir DIR or --checkpoint HUB_ID."
)


class ConfigError(ValueError):
    pass


def check_settings(settings: ServerSettings) -> None:
    if settings.api_key is None and not settings.is_loopback() and not settings.allow_unauthenticated:
        raise ConfigError(
            f"refusing to serve {settings.host} without an API key: set --api-key / OMNIVOX_API_KEY, "
            "or pass --allow-unauthenticated if this network is trusted"
        )


def build_engine(settings: ServerSettings, demo_checkpoint: str | None = None) -> Engine:
    spec = settings.checkpoint_dir or settings.checkpoint
    demo = spec is None
    if demo:
        if demo_checkpoint is None:
            raise ConfigError("no checkpoint given")
        log.warning(DEMO_NOTICE)
        spec = demo_checkpoint
    model = OmniModel.load(
        str(spec),
        device=settings.device,
        dtype=settings.dtype,
        whisper_window=settings.whisper_window,
        decode_graph=settings.decode_graph,
        llm_threads=settings.threads().llm,
    )
    recognizer = None
    if settings.interrupt_detector:
        from streaming.detector import FasterWhisperASR, RecognizerWorker

        recognizer = RecognizerWorker(FasterWhisperASR())
    return Engine(model, settings, demo, recognizer)


class OmnivoxServer(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT first close every session with 1001 (going away)."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine
        self._closing = False
        self._shutdown_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._closing:
            return super().handle_exit(sig, frame)  # a second signal: no more waiting
        self._closing = True
        log.info("shutting down: closing %d sessions", len(self.engine.connections))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return super().handle_exit(sig, frame)
        self._shutdown_task = loop.create_task(self._graceful(sig, frame))

    async def _graceful(self, sig: int, frame: FrameType | None) -> None:
        try:
            await asyncio.wait_for(self.engine.shutdown(1001), self.engine.settings.shutdown_timeout_s)
        except TimeoutError:
            log.warning("sessions did not close in time")
        # Not super().handle_exit: uvicorn would re-raise the signal at exit; a graceful stop exits 0.
        self.should_exit = True


def make_server(engine: Engine) -> OmnivoxServer:
    s = engine.settings
    config = uvicorn.Config(
        create_app(engine),
        host=s.host,
        port=s.port,
        ws="websockets-sansio",  # uvicorn's legacy websockets implementation is deprecated
        ws_max_size=s.max_frame_bytes,
        ws_ping_interval=20,
        ws_ping_timeout=20,
        log_level=s.log_level,
        timeout_graceful_shutdown=int(max(1, s.shutdown_timeout_s)),
        lifespan="off",
    )
    return OmnivoxServer(config, engine)


def start_in_thread(engine: Engine, timeout_s: float = 60.0) -> tuple[OmnivoxServer, threading.Thread, int]:
    """Run the server on a background thread (benchmarks, tests); returns it, the thread and the port."""
    server = make_server(engine)
    thread = threading.Thread(target=server.run, name="omnivox-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the server did not start")
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def serve(settings: ServerSettings, demo_checkpoint: str | None) -> int:
    check_settings(settings)
    for warning in startup_warnings(settings):
        log.warning(warning)
    if settings.log_level != "debug":  # aioice logs every ICE candidate pair check at INFO
        for name in ("aioice", "aiortc"):
            logging.getLogger(name).setLevel(logging.WARNING)
    engine = build_engine(settings, demo_checkpoint)
    server = make_server(engine)
    try:
        server.run()
    finally:
        engine.close()
    return 0
