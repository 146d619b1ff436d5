"""The FastAPI app: /v1/realtime (WebSocket), WebRTC calls, client secrets, health, readiness,
metrics and the web client."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile

from model.omni import OmniModel
from streaming.detector import RecognizerWorker
from streaming.events import ResponseDone
from streaming.runner import ModelRunner
from streaming.semantic_turn import SmartTurn
from streaming.vad import SileroVAD

from .client_secrets import DEFAULT_SECONDS, MAX_SECONDS, MIN_SECONDS, ClientSecret, ClientSecrets, SecretsFull
from .client_secrets import looks_like_secret as _looks_like_secret
from .metrics import Metrics
from .protocol import ProtocolError, SessionIn, SessionUpdate, parse_client_event
from .realtime import Connection, SessionFields, apply_session, initial_fields, session_view
from .settings import ServerSettings
from .transport import WebSocketTransport
from .webrtc import CallError, RtcCall, open_call

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
        self.runner = ModelRunner(model, max_active=max(settings.max_sessions, 1), threads=settings.threads(),
                                  prefill_chunk=settings.prefill_chunk).start()  # fmt: skip
        self.vad = SileroVAD()
        self.turn_model = _load_turn_model() if settings.turn_model else None
        self.metrics = Metrics()
        self.metrics.session_slots.set(settings.max_sessions)
        self.connections: set[Connection] = set()
        self.secrets = ClientSecrets(settings.max_client_secrets, time.time)
        self.calls: dict[str, RtcCall] = {}

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


MAX_BODY_BYTES = 256 * 1024  # a client secret's JSON body, an SDP offer and its session


@dataclass(frozen=True)
class Credential:
    """Who may open a session: the API key holder (secret None) or a client secret's bearer."""

    secret: ClientSecret | None = None


def _bearer(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def _subprotocol_tokens(headers: Mapping[str, str]) -> list[str]:
    protos = (p.strip() for p in headers.get("sec-websocket-protocol", "").split(","))
    return [p[len(SUBPROTOCOL_KEY_PREFIX) :] for p in protos if p.startswith(SUBPROTOCOL_KEY_PREFIX)]


def _is_key(token: str, key: str | None) -> bool:
    return key is not None and hmac.compare_digest(token.encode(), key.encode())


def _authenticate(tokens: list[str], key: str | None, store: ClientSecrets) -> Credential | None:
    """The API key, or a live client secret (left in place: redeem it once the session is sure).
    A token that looks like a client secret but is none (used, expired, unknown) is refused even
    on a server without a key: a page must not silently get a session without its config."""
    if any(_is_key(t, key) for t in tokens):
        return Credential()
    for token in tokens:
        if _looks_like_secret(token):
            secret = store.check(token)
            return Credential(secret) if secret is not None else None
    return Credential() if key is None else None


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _unauthorized(what: str) -> JSONResponse:
    return _error(401, f"unauthorized: {what}", code="invalid_api_key")


async def _body(request: Request) -> bytes | None:
    """The request body, or None when it is larger than MAX_BODY_BYTES (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            return None
    return bytes(data)


def _parse_session(session: Any, param: str) -> SessionIn:
    """A session config in the GA shape (`type` "realtime"), checked as session.update checks it."""
    try:
        text = json.dumps({"type": "session.update", "session": session})
        ev = parse_client_event(text)
    except ProtocolError as e:
        raise ProtocolError(e.code, e.message, (e.param or "session").replace("session", param, 1)) from None
    except (TypeError, ValueError):
        raise ProtocolError("invalid_request", "the session config is not JSON", param) from None
    assert isinstance(ev, SessionUpdate)
    return ev.session


def _checked(engine: Engine, sessions: list[SessionIn], param: str) -> SessionFields:
    fields = initial_fields(engine)
    for sess in sessions:
        try:
            fields = apply_session(fields, sess)
        except ProtocolError as e:
            raise ProtocolError(e.code, e.message, param) from None
    return fields


def startup_warnings(settings: ServerSettings) -> list[str]:
    out = []
    if settings.demo_tokens and settings.api_key is not None and not settings.is_loopback():
        out.append(
            f"--demo-tokens is on while serving {settings.host} with an API key: anyone who can reach "
            "POST /v1/demo/client_secret gets a session without the key. Use it for demos only."
        )
    return out


def create_app(engine: Engine) -> FastAPI:
    settings = engine.settings
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    app = FastAPI(title="omnivox", docs_url=None, redoc_url=None)
    if settings.cors_origins:
        # Browsers on another origin (an app's own page, OpenAI's browser SDK) call the calls and
        # client-secret endpoints with Authorization and the SDK's own headers: a preflight.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Location"])  # fmt: skip
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

    def new_session_id() -> str:
        return "sess_" + secrets.token_hex(8)

    async def serve_session(conn: Connection, what: str) -> None:
        """Run a session that holds a slot; the slot is free again when this returns."""
        engine.metrics.active_sessions.set(len(engine.connections))
        log.info("%s %s opened (%d/%d slots used)", what, conn.session_id, len(engine.connections),
                 settings.max_sessions)  # fmt: skip
        try:
            await conn.run()
        finally:
            engine.connections.discard(conn)
            engine.metrics.active_sessions.set(len(engine.connections))
            log.info("%s %s closed", what, conn.session_id)
            if _MALLOC_TRIM is not None:
                await asyncio.to_thread(_MALLOC_TRIM)

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        tokens = [t for t in [_bearer(ws.headers), *_subprotocol_tokens(ws.headers)] if t]
        cred = _authenticate(tokens, key, engine.secrets)
        if cred is None:
            log.info("refused a connection: missing or wrong API key or client secret")
            await ws.send_denial_response(Response("unauthorized: missing or wrong API key\n", status_code=401))
            return
        if engine.slots_free <= 0:
            await ws.send_denial_response(Response("no session slot free\n", status_code=503))
            return
        initial: list[SessionIn] = []
        session_id = new_session_id()
        if cred.secret is not None:
            engine.secrets.redeem(cred.secret.value)  # used up: no await since it was checked
            session_id = cred.secret.session_id
            initial = [cred.secret.session] if cred.secret.session is not None else []
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        conn = Connection(WebSocketTransport(ws), engine, session_id, initial)
        engine.connections.add(conn)
        try:
            await serve_session(conn, "session")
        finally:
            with contextlib.suppress(Exception):  # bounded: a client that reads nothing takes no close frame
                await asyncio.wait_for(ws.close(), settings.send_timeout_s)

    # ---------------- client secrets ----------------

    def mint(body: Any, lifetime: float | None) -> Response:
        """`lifetime` None: OpenAI's expires_after rules; else the demo endpoint's fixed lifetime."""
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        seconds = DEFAULT_SECONDS
        expires = body.get("expires_after")
        if expires is not None:
            if not isinstance(expires, dict) or expires.get("anchor", "created_at") != "created_at":
                return _error(400, "expires_after.anchor must be 'created_at'", "expires_after.anchor")
            n = expires.get("seconds", DEFAULT_SECONDS)
            if isinstance(n, bool) or not isinstance(n, int) or not MIN_SECONDS <= n <= MAX_SECONDS:
                return _error(400, f"expires_after.seconds must be an integer from {MIN_SECONDS} to {MAX_SECONDS}",
                              "expires_after.seconds")  # fmt: skip
            seconds = n
        sessions: list[SessionIn] = []
        try:
            if body.get("session") is not None:
                sessions.append(_parse_session(body["session"], "session"))
            fields = _checked(engine, sessions, "session")
        except ProtocolError as e:
            return _error(400, e.message, e.param, e.code)
        session_id = new_session_id()
        config = sessions[0] if sessions else None
        try:
            if lifetime is None:
                secret = engine.secrets.mint(seconds, session_id, config)
            else:
                secret = engine.secrets.mint_short(min(seconds, lifetime), session_id, config)
        except SecretsFull as e:
            return _error(429, str(e), code="rate_limit_exceeded")
        log.info("minted a client secret for session %s (expires in %g s)", session_id,
                 secret.expires_at - engine.secrets.clock())  # fmt: skip  # never the value
        view = session_view(fields, session_id, engine)
        return JSONResponse({"value": secret.value, "expires_at": int(secret.expires_at), "session": view})

    async def json_body(request: Request) -> Any:
        raw = await _body(request)
        if raw is None:
            raise ProtocolError("invalid_request", f"the body is larger than {MAX_BODY_BYTES} bytes")
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise ProtocolError("invalid_json", "the body is not JSON") from None

    @app.post("/v1/realtime/client_secrets")
    async def client_secrets(request: Request) -> Response:
        if key is not None and not _is_key(_bearer(request.headers) or "", key):
            return _unauthorized("client secrets are minted with the server's API key")
        try:
            body = await json_body(request)
        except ProtocolError as e:
            return _error(400, e.message, code=e.code)
        return mint(body, None)

    @app.post("/v1/demo/client_secret")
    async def demo_client_secret(request: Request) -> Response:
        if not settings.demo_tokens:
            return _error(404, "not found (the operator has not enabled demo tokens)")
        try:
            body = await json_body(request)
        except ProtocolError as e:
            return _error(400, e.message, code=e.code)
        return mint(body, settings.demo_token_seconds)

    # ---------------- WebRTC calls ----------------

    @app.post("/v1/realtime/calls")
    async def create_call(request: Request) -> Response:
        token = _bearer(request.headers)
        cred = _authenticate([token] if token else [], key, engine.secrets)
        if cred is None:
            return _unauthorized("missing or wrong API key or client secret")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        sessions: list[SessionIn] = [cred.secret.session] if cred.secret and cred.secret.session else []
        try:
            if ctype == "application/sdp":
                raw = await _body(request)
                if raw is None:
                    return _error(413, f"the offer is larger than {MAX_BODY_BYTES} bytes")
                offer = raw.decode("utf-8", "replace")
            elif ctype == "multipart/form-data":
                form = await request.form(max_files=4, max_fields=8, max_part_size=MAX_BODY_BYTES)
                sdp, sess = form.get("sdp"), form.get("session")
                offer = (await sdp.read()).decode("utf-8", "replace") if isinstance(sdp, UploadFile) else sdp or ""
                if sess is not None:
                    text = (await sess.read()).decode("utf-8", "replace") if isinstance(sess, UploadFile) else sess
                    try:
                        sessions.append(_parse_session(json.loads(text), "session"))
                    except ValueError:
                        return _error(400, "the session field is not JSON", "session")
            else:
                return _error(415, "send the SDP offer as application/sdp or multipart/form-data (sdp, session)")
            if not offer.lstrip().startswith("v=0"):
                return _error(400, "the body is not an SDP offer", "sdp")
            _checked(engine, sessions, "session")
        except ProtocolError as e:
            return _error(400, e.message, e.param, e.code)
        if engine.slots_free <= 0:
            return _error(503, "no session slot free")
        session_id = cred.secret.session_id if cred.secret is not None else new_session_id()
        call_id = "rtc_" + secrets.token_hex(12)
        try:
            call, answer = await open_call(engine, call_id, offer, session_id, sessions)
        except CallError as e:
            return _error(400, str(e), "sdp")  # the secret is not used up by a bad offer
        # Used up only now (no await from here on): a secret that expired, or opened another
        # session, while the answer was made opens nothing.
        refusal = None
        if cred.secret is not None and engine.secrets.redeem(cred.secret.value) is None:
            refusal = _unauthorized("the client secret expired or was used meanwhile")
        elif engine.slots_free <= 0:  # another session took the last slot meanwhile
            refusal = _error(503, "no session slot free")
        if refusal is not None:
            await call.transport.close()
            return refusal
        engine.connections.add(call.conn)
        engine.calls[call_id] = call

        async def run_call() -> None:
            try:
                await serve_session_call(call)
            finally:
                engine.calls.pop(call_id, None)

        call.task = asyncio.get_running_loop().create_task(run_call())
        return Response(answer, status_code=201, media_type="application/sdp",
                        headers={"Location": f"/v1/realtime/calls/{call_id}"})  # fmt: skip

    async def serve_session_call(call: RtcCall) -> None:
        conn = call.conn
        try:
            if not await call.transport.wait_ready(settings.rtc_connect_timeout_s):
                engine.connections.discard(conn)
                engine.metrics.active_sessions.set(len(engine.connections))
                return
            await serve_session(conn, f"call {call.call_id} session")
        finally:
            engine.connections.discard(conn)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call.transport.close(), 5)

    @app.post("/v1/realtime/calls/{call_id}/hangup")
    async def hangup(call_id: str, request: Request) -> Response:
        if key is not None and not _is_key(_bearer(request.headers) or "", key):
            return _unauthorized("hanging up takes the server's API key")
        call = engine.calls.get(call_id)
        if call is None:
            return _error(404, f"no call {call_id!r}", "call_id")
        await call.hangup()
        return Response(status_code=200)

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
