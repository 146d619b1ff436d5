"""Client secrets: the sans-I/O store under a fake clock, then `POST /v1/realtime/client_secrets`
through the official openai SDK and the sessions the secrets open (WebSocket; WebRTC calls are in
test_webrtc.py), and the operator's demo token endpoint."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from server.app import startup_warnings
from server.client_secrets import MAX_SECONDS, MIN_SECONDS, ClientSecrets, SecretsFull
from server.settings import ServerSettings

from .test_server import Running, open_client, start_server, stop_server

KEY = "s3cret-key"


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------- the store ----------------


def test_a_secret_opens_one_session_then_is_gone() -> None:
    clock = FakeClock()
    store = ClientSecrets(8, clock)
    s = store.mint(600, "sess_a", {"instructions": "x"})
    assert s.value.startswith("ek_") and len(s.value) > 40 and s.expires_at == clock.t + 600
    assert store.check(s.value) is s and store.check(s.value) is s  # checking does not use it up
    assert store.redeem(s.value) is s
    assert store.redeem(s.value) is None and store.check(s.value) is None and len(store) == 0


def test_expiry_on_the_clock() -> None:
    clock = FakeClock()
    store = ClientSecrets(8, clock)
    s = store.mint(10, "sess_a")
    clock.t += 9.999
    assert store.check(s.value) is s
    clock.t += 0.001
    assert store.check(s.value) is None and store.redeem(s.value) is None and len(store) == 0


@pytest.mark.parametrize("bad", ["", "ek_", "ek_nope", "x" * 200, "ek_\udcff"])
def test_unknown_values_are_refused(bad: str) -> None:
    store = ClientSecrets(8, FakeClock())
    s = store.mint(60, "sess_a")
    assert store.check(bad) is None and store.redeem(bad) is None
    assert store.check(s.value[:-1] + ("0" if s.value[-1] != "0" else "1")) is None  # one character off
    assert store.check(s.value) is s


def test_bounds_of_expires_after() -> None:
    store = ClientSecrets(8, FakeClock())
    for seconds in (MIN_SECONDS - 1, MAX_SECONDS + 1, 0, -5):
        with pytest.raises(ValueError):
            store.mint(seconds, "sess")
    store.mint(MIN_SECONDS, "sess")
    store.mint(MAX_SECONDS, "sess")


def test_bounded_in_number_expired_ones_make_room() -> None:
    clock = FakeClock()
    store = ClientSecrets(3, clock)
    early = store.mint(10, "a")
    live = [store.mint(600, "b"), store.mint(600, "c")]
    with pytest.raises(SecretsFull):  # no live secret is evicted to make room
        store.mint(600, "d")
    clock.t += 11  # the first expired: its slot is reused
    d = store.mint(600, "d")
    assert store.check(early.value) is None and all(store.check(s.value) is s for s in [*live, d])
    with pytest.raises(SecretsFull):
        store.mint(600, "e")
    store.redeem(d.value)  # a used secret frees its slot too
    store.mint(600, "e")
    assert len(store) == 3


# ---------------- over HTTP ----------------


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[Running]:
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, api_key=KEY, max_sessions=2,
                                    interrupt_detector=False, turn_model=False, demo_tokens=True,
                                    demo_token_seconds=1.0, log_level="warning"))  # fmt: skip
    yield r
    stop_server(r)


def sdk(server: Running, key: str = KEY) -> Any:
    from openai import OpenAI

    return OpenAI(api_key=key, base_url=f"http://127.0.0.1:{server.port}/v1", max_retries=0)


SESSION = {
    "type": "realtime",
    "model": "gpt-realtime",
    "instructions": "You are a pirate.",
    "output_modalities": ["text"],
    "audio": {"input": {"turn_detection": None}},
}


def test_sdk_mints_a_secret_and_its_config_is_the_session(server: Running) -> None:
    t0 = time.time()
    got = sdk(server).realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 120}, session=SESSION
    )
    assert got.value.startswith("ek_") and abs(got.expires_at - (t0 + 120)) <= 2
    assert got.session.type == "realtime" and got.session.instructions == "You are a pirate."
    assert got.session.output_modalities == ["text"]
    c = open_client(server, additional_headers={"Authorization": f"Bearer {got.value}"})
    created = c.events[0]["session"]
    # The session the secret opens is the one its answer showed, config applied before session.created.
    assert created == got.to_dict()["session"]
    assert created["id"] == got.session.id and created["instructions"] == "You are a pirate."
    assert created["output_modalities"] == ["text"] and created["audio"]["input"]["turn_detection"] is None
    c.ws.close()
    # Used: the same secret opens nothing more, before any upgrade.
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{server.port}/v1/realtime", open_timeout=5,
                additional_headers={"Authorization": f"Bearer {got.value}"})  # fmt: skip
    assert info.value.response.status_code == 401


def test_the_answer_is_valid_against_openais_type(server: Running) -> None:
    from openai.types.realtime import ClientSecretCreateResponse

    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/v1/realtime/client_secrets", method="POST",
        data=json.dumps({"expires_after": {"anchor": "created_at", "seconds": 10}, "session": SESSION}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )  # fmt: skip
    body = json.loads(urllib.request.urlopen(req, timeout=5).read())
    ClientSecretCreateResponse.model_validate(body)  # strict pydantic validation, not the SDK's lenient construct
    assert set(body) == {"value", "expires_at", "session"} and isinstance(body["expires_at"], int)


def test_default_expiry_and_the_browser_subprotocol(server: Running) -> None:
    got = sdk(server).realtime.client_secrets.create()
    assert abs(got.expires_at - (time.time() + 600)) <= 2
    c = open_client(server, subprotocols=["realtime", f"openai-insecure-api-key.{got.value}"])
    assert c.ws.subprotocol == "realtime" and c.events[0]["session"]["id"] == got.session.id
    c.ws.close()
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{server.port}/v1/realtime", open_timeout=5,
                subprotocols=["realtime", f"openai-insecure-api-key.{got.value}"])  # fmt: skip
    assert info.value.response.status_code == 401


def test_minting_needs_the_api_key_and_a_valid_body(server: Running) -> None:
    import openai

    for key in ("wrong", "ek_" + "0" * 48):
        with pytest.raises(openai.AuthenticationError):
            sdk(server, key).realtime.client_secrets.create()
    client = sdk(server)
    for kwargs in ({"expires_after": {"anchor": "created_at", "seconds": 9}},
                   {"expires_after": {"anchor": "created_at", "seconds": 7201}},
                   {"session": {"type": "realtime", "output_modalities": ["video"]}},
                   {"session": {"type": "transcription"}},
                   {"session": {"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcm",
                                                                                    "rate": 16000}}}}}):  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            client.realtime.client_secrets.create(**kwargs)


def test_unknown_and_expired_secrets_get_401(server: Running) -> None:
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    with pytest.raises(InvalidStatus) as info:
        connect(url, open_timeout=5, additional_headers={"Authorization": "Bearer ek_" + "ab" * 24})
    assert info.value.response.status_code == 401
    # A real short expiry, through HTTP: the demo endpoint's lifetime is 1 s on this server.
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/demo/client_secret", data=b"", method="POST")
    minted = json.loads(urllib.request.urlopen(req, timeout=5).read())
    assert minted["expires_at"] <= time.time() + 2 and minted["session"]["type"] == "realtime"
    time.sleep(1.3)
    with pytest.raises(InvalidStatus) as info:
        connect(url, open_timeout=5, additional_headers={"Authorization": f"Bearer {minted['value']}"})
    assert info.value.response.status_code == 401


def test_secrets_are_never_logged(server: Running, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        got = sdk(server).realtime.client_secrets.create()
        c = open_client(server, additional_headers={"Authorization": f"Bearer {got.value}"})
        c.ws.close()
        with pytest.raises(InvalidStatus):
            connect(f"ws://127.0.0.1:{server.port}/v1/realtime", open_timeout=5,
                    additional_headers={"Authorization": f"Bearer {got.value}"})  # fmt: skip
        time.sleep(0.3)
    # The test's own clients log what they send at DEBUG; the server's side must not.
    client_side = ("websockets.client", "httpx", "httpcore", "openai")
    server_side = [r for r in caplog.records if not r.name.startswith(client_side)]
    assert server_side and not any(got.value in r.getMessage() for r in server_side)


def test_demo_tokens_are_off_by_default(tiny_ckpt: Path) -> None:
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, interrupt_detector=False, turn_model=False,
                                    log_level="warning"))  # fmt: skip
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{r.port}/v1/demo/client_secret", data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        assert info.value.code == 404
    finally:
        stop_server(r)


def test_cors_only_for_the_configured_origins(tiny_ckpt: Path) -> None:
    """An app's page on another origin (e.g. OpenAI's browser SDK, which adds its own header)
    passes the preflight of the calls endpoint; other origins get no CORS headers."""
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, interrupt_detector=False, turn_model=False,
                                    cors_origins=("https://app.example",), log_level="warning"))  # fmt: skip
    try:
        for origin, allowed in (("https://app.example", True), ("https://evil.example", False)):
            req = urllib.request.Request(f"http://127.0.0.1:{r.port}/v1/realtime/calls", method="OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-openai-agents-sdk"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    headers = resp.headers
            except urllib.error.HTTPError as e:
                headers = e.headers
            assert (headers.get("access-control-allow-origin") == origin) is allowed, origin
    finally:
        stop_server(r)


def test_demo_tokens_warn_when_exposed() -> None:
    assert startup_warnings(ServerSettings(demo_tokens=True, api_key=KEY, host="0.0.0.0"))
    assert not startup_warnings(ServerSettings(demo_tokens=True, api_key=KEY))  # loopback
    assert not startup_warnings(ServerSettings(api_key=KEY, host="0.0.0.0"))  # off
