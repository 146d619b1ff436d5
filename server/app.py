"""The FastAPI app: /v1/realtime, health, readiness, metrics and the web client."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from model.omni import OmniModel
from streaming.detector import RecognizerWorker
from streaming.events import ResponseDone
from streaming.runner import ModelRunner
from streaming.semantic_turn import SmartTurn
from streaming.vad import SileroVAD

from .metrics import Metrics
from .realtime import Connection
from .settings import ServerSettings

log = logging.getLogger("omnivox.server")

SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."


class Engine:
    """What every session shares: the model runner, the VAD, the command recognizer."""

    def __init__(
        self, model: OmniModel, settings: ServerSettings, demo: bool, recognizer: RecognizerWorker | None
    ) -> None:
        self.model = model
        self.settings = settings
        self.demo = demo
        self.recognizer = recognizer
        self.runner = ModelRunner(model, max_active=max(settings.max_sessions, 1)).start()
        self.vad = SileroVAD()
        self.turn_model = _load_turn_model() if settings.turn_model else None
        self.metrics = Metrics()
        self.metrics.session_slots.set(settings.max_sessions)
        self.connections: set[Connection] = set()

    @property
    def slots_free(self) -> int:
        return self.settings.max_sessions - len(self.connections)

    def on_event(self, kind: str, value: object) -> None:
        m = self.metrics
        if kind == "error":
            m.errors.labels(code=str(value)).inc()
        elif kind == "interrupt":
            m.interrupts.labels(mode=str(value)).inc()
        elif kind == "response_done" and isinstance(value, ResponseDone):
            m.responses.labels(status=value.status).inc()
            ttfa = value.timings.get("ttfa_ms")
            if ttfa is not None:
                m.ttfa.observe(ttfa / 1000)
            sps = value.timings.get("steps_per_s")
            if sps:
                m.steps_per_s.set(sps)

    async def shutdown(self, code: int = 1001) -> None:
        await asyncio.gather(*(c.close(code, "server shutting down") for c in list(self.connections)))

    def close(self) -> None:
        self.runner.close()
        if self.recognizer is not None:
            self.recognizer.close()


def _libc_malloc_trim() -> Callable[[], None] | None:
    """glibc's malloc_trim, where there is one: memory freed by a closed session (numpy and
    torch buffers from many threads) goes back to the OS instead of staying in malloc's arenas."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None

    def release() -> None:
        trim(0)

    return release


_MALLOC_TRIM = _libc_malloc_trim()


def _load_turn_model() -> SmartTurn | None:
    try:
        return SmartTurn()
    except Exception as e:  # semantic_vad then ends turns after 500 ms of silence, as server_vad
        log.warning("semantic_vad runs without its end-of-turn model: %s", e)
        return None


def _authorized(ws: WebSocket, key: str | None) -> bool:
    if key is None:
        return True
    auth = ws.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip().encode(), key.encode()):
        return True
    for proto in ws.headers.get("sec-websocket-protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(SUBPROTOCOL_KEY_PREFIX):
            if hmac.compare_digest(proto[len(SUBPROTOCOL_KEY_PREFIX) :].encode(), key.encode()):
                return True
    return False


def create_app(engine: Engine) -> FastAPI:
    settings = engine.settings
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    app = FastAPI(title="omnivox", docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        free = engine.slots_free
        body = {"status": "ready" if free > 0 else "full", "free_slots": free, "model": engine.model.config.name}
        return JSONResponse(body, status_code=200 if free > 0 else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        engine.metrics.active_sessions.set(len(engine.connections))
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        if not _authorized(ws, key):
            log.info("refused a connection: missing or wrong API key")
            await ws.send_denial_response(Response("unauthorized: missing or wrong API key\n", status_code=401))
            return
        if engine.slots_free <= 0:
            await ws.send_denial_response(Response("no session slot free\n", status_code=503))
            return
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        session_id = "sess_" + secrets.token_hex(8)
        conn = Connection(ws, engine, session_id)
        engine.connections.add(conn)
        engine.metrics.active_sessions.set(len(engine.connections))
        log.info("session %s opened (%d/%d slots used)", session_id, len(engine.connections), settings.max_sessions)
        try:
            await conn.run()
        finally:
            engine.connections.discard(conn)
            engine.metrics.active_sessions.set(len(engine.connections))
            with contextlib.suppress(Exception):  # bounded: a client that reads nothing takes no close frame
                await asyncio.wait_for(ws.close(), settings.send_timeout_s)
            log.info("session %s closed", session_id)
            if _MALLOC_TRIM is not None:
                await asyncio.to_thread(_MALLOC_TRIM)

    web_dir = settings.web_dir or Path(__file__).resolve().parent.parent / "clients" / "web"
    if (web_dir / "index.html").is_file():
        app.mount("/", StaticFiles(directory=str(web_dir), html=True), name="web")
    else:

        @app.get("/")
        async def index() -> HTMLResponse:
            return HTMLResponse(
                "<!doctype html><title>omnivox</title><h1>omnivox</h1>"
                "<p>The realtime API is at <code>/v1/realtime</code>; the web client is not installed here.</p>"
            )

    return app
