"""Fuzzed client input, a client that stops reading, SIGTERM, and settings rules."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from server.protocol import KNOWN_TYPES
from server.serve import ConfigError, check_settings
from server.settings import ServerSettings

from .test_server import Client, Running, is_done, open_client, start_server, stop_server, text_item

ERROR_CODES = {"invalid_json", "unknown_event", "invalid_event", "invalid_audio", "input_audio_buffer_commit_empty",
               "response_in_progress", "response_cancel_not_active", "image_not_supported", "invalid_request",
               "rate_limited", "input_too_long"}  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path):
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, max_sessions=4, max_new_tokens=8,
                                    interrupt_detector=False, log_level="warning"))  # fmt: skip
    yield r
    stop_server(r)


@pytest.fixture(scope="module")
def fuzz_client(server: Running):
    c = open_client(server)
    yield c
    c.ws.close()


def _alive(c: Client) -> None:
    c.send({"type": "session.update", "session": {"type": "realtime", "instructions": "ping"}})
    c.recv_until(lambda e: e["type"] == "session.updated", timeout=10)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["audio", "session", "item", "response", "item_id", "audio_end_ms", "content_index", "played_ms",
          "response_id", "previous_item_id", "event_id"]  # fmt: skip


@given(st.text(max_size=200))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_raw_text_frames(fuzz_client: Client, text: str) -> None:
    fuzz_client.ws.send(text)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("type") in KNOWN_TYPES:
        _alive(fuzz_client)
        return
    # Errors of earlier examples may still be in flight (session errors come through the
    # event pump): wait for this frame's error, then check nothing unexpected came.
    expected = {"invalid_json", "unknown_event", "invalid_event"}
    got = fuzz_client.recv_until(lambda e: e["type"] == "error" and e["error"]["code"] in expected, timeout=10)
    assert all(e["error"]["code"] in ERROR_CODES for e in got if e["type"] == "error")
    _alive(fuzz_client)


@given(st.sampled_from(sorted(KNOWN_TYPES - {"response.create"})),
       st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4))  # fmt: skip
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_events(fuzz_client: Client, kind: str, fields: dict[str, Any]) -> None:
    fuzz_client.send({**fields, "type": kind})
    _alive(fuzz_client)  # whatever it was, the session still answers
    errors = [e for e in fuzz_client.events if e["type"] == "error"]
    assert all(e["error"]["code"] in ERROR_CODES for e in errors)


@given(st.binary(max_size=300))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_binary_frames_while_binary_audio_is_off(fuzz_client: Client, data: bytes) -> None:
    fuzz_client.ws.send(data)
    got = fuzz_client.recv_until(lambda e: e["type"] == "error" and e["error"]["code"] == "invalid_event", timeout=10)
    assert all(e["error"]["code"] in ERROR_CODES for e in got if e["type"] == "error")


def test_fuzzing_leaks_no_session(server: Running) -> None:
    c = open_client(server)
    for i in range(30):
        c.ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (i % 7)}))
    c.ws.close()
    deadline = time.monotonic() + 5
    while len(server.engine.connections) > 1 and time.monotonic() < deadline:  # 1 = the fuzz client
        time.sleep(0.02)
    assert len(server.engine.connections) <= 1


def _raw_ws(port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0]
    return sock


def _frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    return bytes([0x81]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_client_that_stops_reading_is_cut_off(tiny_ckpt: Path) -> None:
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, send_buffer_events=32, interrupt_detector=False,
                                    log_level="warning"))  # fmt: skip
    try:
        good = open_client(r)
        slow = _raw_ws(r.port)
        bad = _frame(json.dumps({"type": "nope", "event_id": "x" * 500})) * 50  # each earns a ~1.3 kB error event
        deadline = time.monotonic() + 60
        cut = False
        while time.monotonic() < deadline and not cut:
            try:
                slow.sendall(bad)
            except OSError:
                cut = True
            cut = cut or len(r.engine.connections) == 1
            time.sleep(0.01)
        assert cut, "the slow reader was never disconnected"
        slow.close()
        # The well-behaved client was not held up meanwhile.
        good.send(text_item("Hi"))
        good.send({"type": "response.create"})
        assert good.recv_until(is_done, timeout=20)[-1]["response"]["status"] in ("completed", "incomplete")
        good.ws.close()
    finally:
        stop_server(r)


def test_sigterm_closes_sessions_with_1001_and_exits(tiny_ckpt: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMNIVOX_INTERRUPT_DETECTOR": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnivox", "serve", "--port", "0", "--checkpoint-dir", str(tiny_ckpt)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        port = None
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if m := re.search(r"running on http://127\.0\.0\.1:(\d+)", line, re.IGNORECASE):
                port = int(m.group(1))
        assert port, "server did not report its port"
        ws = connect(f"ws://127.0.0.1:{port}/v1/realtime", open_timeout=10)
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_settings_from_environment_and_bind_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIVOX_MAX_SESSIONS", "3")
    monkeypatch.setenv("OMNIVOX_API_KEY", "s3cr3t-key-xyz")
    s = ServerSettings()
    assert s.max_sessions == 3 and s.api_key is not None and "s3cr3t" not in repr(s)  # the key is never printed
    check_settings(ServerSettings(host="0.0.0.0", api_key="k"))
    monkeypatch.delenv("OMNIVOX_API_KEY")
    with pytest.raises(ConfigError, match="without an API key"):
        check_settings(ServerSettings(host="0.0.0.0"))
    check_settings(ServerSettings(host="0.0.0.0", allow_unauthenticated=True))
    check_settings(ServerSettings(host="127.0.0.1"))
