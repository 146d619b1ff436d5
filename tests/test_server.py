"""The realtime server on 127.0.0.1 (port 0): protocol, barge-in, SDK, bad input, auth, limits."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from server.app import Engine
from server.serve import build_engine, start_in_thread
from server.settings import ServerSettings

from .conftest import fixture_audio
from .openai_events import check_server_event


def b64pcm(audio: np.ndarray) -> str:
    pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes()
    return base64.b64encode(pcm).decode()


class Running:
    def __init__(self, engine: Engine, thread: threading.Thread, server: Any, port: int) -> None:
        self.engine, self.thread, self.server, self.port = engine, thread, server, port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime?model=gpt-realtime"


def start_server(settings: ServerSettings) -> Running:
    engine = build_engine(settings)
    srv, thread, port = start_in_thread(engine)
    return Running(engine, thread, srv, port)


def stop_server(r: Running) -> None:
    r.server.should_exit = True
    r.thread.join(15)
    r.engine.close()


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[Running]:
    # float32: the audio-equality test compares with the fp32 engine token for token.
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, max_sessions=4, dtype="float32",
                                    log_level="warning"))  # fmt: skip
    yield r
    stop_server(r)


class Client:
    """A raw WebSocket client that checks every event it receives against openai's types."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.extensions = False  # set once this client sent an `omnivox` session option

    def send(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if event.get("type") == "session.update" and isinstance(session, dict) and "omnivox" in session:
            self.extensions = True
        self.ws.send(json.dumps(event))

    def recv_until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
            if isinstance(msg, str):
                ev = json.loads(msg)
                check_server_event(ev, self.extensions)
            else:
                ev = {"type": "binary", "data": msg}
            got.append(ev)
            self.events.append(ev)
            if pred(ev):
                return got
        raise AssertionError(f"timed out; got {[e['type'] for e in got][-30:]}")

    def update(self, **session: Any) -> dict[str, Any]:
        self.send({"type": "session.update", "session": {"type": "realtime", **session}})
        return self.recv_until(lambda e: e["type"] in ("session.updated", "error"))[-1]

    def speak(self, audio: np.ndarray, chunk: int = 3200) -> None:
        for i in range(0, audio.size, chunk):
            self.send({"type": "input_audio_buffer.append", "audio": b64pcm(audio[i : i + chunk])})


def open_client(server: Running, **kw: Any) -> Client:
    c = Client(connect(server.url, open_timeout=10, max_size=None, **kw))
    first = c.recv_until(lambda e: True)[0]
    assert first["type"] == "session.created"
    return c


def silence(s: float) -> np.ndarray:
    return np.zeros(int(s * 16000), np.float32)


INPUT_16K = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}


def text_item(text: str) -> dict[str, Any]:
    content = [{"type": "input_text", "text": text}]
    return {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": content}}


def types(events: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for e in events:
        if not out or out[-1] != e["type"] or not e["type"].endswith(".delta"):
            out.append(e["type"])
    return out


def is_done(e: dict[str, Any]) -> bool:
    return e["type"] == "response.done"


def test_scripted_conversation(server: Running) -> None:
    c = open_client(server)
    created = c.events[0]["session"]
    assert created["model"] == "mini-omni-random-tiny" and created["omnivox"]["demo_checkpoint"] is False
    upd = c.update(**INPUT_16K, omnivox={})  # omnivox: response.done carries our timings
    assert upd["type"] == "session.updated" and upd["session"]["audio"]["input"]["format"]["rate"] == 16000
    c.speak(np.concatenate([silence(0.4), fixture_audio("question"), silence(1.0)]))
    events = c.recv_until(is_done)
    order = types(events)
    expected_start = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                      "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
                      "response.created", "response.output_item.added", "conversation.item.added",
                      "response.content_part.added"]  # fmt: skip
    assert order[: len(expected_start)] == expected_start
    assert "response.output_audio.delta" in order and "response.output_audio_transcript.delta" in order
    assert order[-7:] == ["response.output_audio.done", "response.output_audio_transcript.done",
                          "response.content_part.done", "response.output_item.done", "conversation.item.done",
                          "response.done"][-7:] or order[-6:] == ["response.output_audio.done",
                          "response.output_audio_transcript.done", "response.content_part.done",
                          "response.output_item.done", "conversation.item.done", "response.done"]  # fmt: skip
    user_item = events[0]["item_id"]
    assert events[1]["item_id"] == user_item == events[2]["item_id"]
    created_ev = next(e for e in events if e["type"] == "response.created")
    rid = created_ev["response"]["id"]
    item = next(e for e in events if e["type"] == "response.output_item.added")["item"]["id"]
    deltas = [e for e in events if e["type"].startswith("response.output_audio")]
    assert all(e["response_id"] == rid and e["item_id"] == item for e in deltas)
    done = events[-1]["response"]
    assert done["id"] == rid and done["status"] == "completed" and done["usage"]["output_tokens"] > 0
    transcript = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    assert done["output"][0]["content"][0]["transcript"] == transcript
    assert done["omnivox"]["ttfa_ms"] > 0 and done["omnivox"]["steps"] > 0
    ids = [e["event_id"] for e in c.events]
    assert len(set(ids)) == len(ids)
    c.ws.close()


def test_audio_deltas_equal_the_engine(server: Running, tiny_model) -> None:
    from model.prompts import Task

    c = open_client(server)
    c.update(audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}})
    q = fixture_audio("question")
    c.speak(q)
    c.send({"type": "input_audio_buffer.commit"})
    c.send({"type": "response.create"})  # as OpenAI: a commit alone starts no response
    events = c.recv_until(is_done)
    pcm = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    got = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    result = tiny_model.start(tiny_model.prompt(Task.A1A2, audio=q)).run()
    ref = np.round(np.clip(tiny_model.decode_frames(result.frames), -1, 1) * 32767)
    assert got.shape == ref.shape and np.max(np.abs(got - ref)) <= 2
    c.ws.close()


def _speaking(server: Running, **omnivox: Any) -> tuple[Client, str]:
    c = open_client(server)
    c.update(**INPUT_16K, omnivox={"max_audio_lead_ms": 600, **omnivox})
    c.speak(np.concatenate([silence(0.3), fixture_audio("question"), silence(0.8)]))
    events = c.recv_until(lambda e: e["type"] == "response.output_audio.delta")
    rid = next(e for e in events if e["type"] == "response.created")["response"]["id"]
    return c, rid


def test_barge_in_stop_omni(server: Running) -> None:
    c, rid = _speaking(server)
    c.speak(np.concatenate([fixture_audio("stop_omni"), silence(0.7)]), chunk=512)
    events = c.recv_until(lambda e: e["type"] == "response.done", timeout=15)
    names = [e["type"] for e in events]
    i = names.index("omnivox.interrupt")
    assert names[i - 1] == "input_audio_buffer.speech_started"
    assert events[i]["response_id"] == rid and events[i]["phrase"] in ("stop omni", "stop")
    done = events[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    assert "response.output_audio.delta" not in names[i:]
    time.sleep(1.5)  # the utterance's later command checks have had time to answer
    c.send({"type": "input_audio_buffer.clear"})  # the session lives on
    after = c.recv_until(lambda e: e["type"] == "input_audio_buffer.cleared")
    assert not any(e["type"] == "response.output_audio.delta" for e in after)
    # One utterance: one speech_started and one interrupt, nothing more about the response.
    heard = names[names.index("response.output_audio.delta") :] + [e["type"] for e in after]
    assert heard.count("input_audio_buffer.speech_started") == 1 and heard.count("omnivox.interrupt") == 1
    assert not any(e.get("response_id") == rid for e in after)
    c.ws.close()


def test_backchannel_does_not_interrupt(server: Running) -> None:
    c, _ = _speaking(server)
    c.speak(np.concatenate([fixture_audio("yeah"), silence(0.7)]), chunk=512)
    events = c.recv_until(is_done, timeout=20)
    assert not any(e["type"] == "omnivox.interrupt" for e in events)
    assert events[-1]["response"]["status"] == "completed"
    c.ws.close()


def test_binary_audio_mode(server: Running) -> None:
    c = open_client(server)
    c.ws.send(b"\x00\x00")
    err = c.recv_until(lambda e: e["type"] == "error")[-1]
    assert err["error"]["code"] == "invalid_event"
    upd = c.update(audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}},
                   omnivox={"binary_audio": True})  # fmt: skip
    assert upd["session"]["omnivox"]["binary_audio"] is True
    assert upd["session"]["omnivox"]["max_audio_lead_ms"] == 1000  # the server's default
    q = np.clip(np.round(fixture_audio("question") * 32768), -32768, 32767).astype("<i2").tobytes()
    c.ws.send(q)
    c.send({"type": "input_audio_buffer.commit"})
    c.send({"type": "response.create"})
    events = c.recv_until(is_done)
    frames = [e["data"] for e in events if e["type"] == "binary"]
    assert frames
    n = int.from_bytes(frames[0][:4], "little")
    header = json.loads(frames[0][4 : 4 + n])
    rid = events[-1]["response"]["id"]
    assert header["response_id"] == rid and header["seq"] == 0 and len(frames[0]) - 4 - n == 4096
    assert not any(e["type"] == "response.output_audio.delta" for e in events)
    c.ws.close()


def test_text_turn_and_text_output(server: Running) -> None:
    c = open_client(server)
    c.send(text_item("Hello!"))
    c.recv_until(lambda e: e["type"] == "conversation.item.done")
    c.send({"type": "response.create", "response": {"output_modalities": ["text"]}, "event_id": "ev1"})
    events = c.recv_until(is_done)
    names = types(events)
    assert "response.output_text.delta" in names and "response.output_text.done" in names
    assert "response.output_audio.delta" not in names
    c.ws.close()


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        (json.dumps({"type": "nope.nope", "event_id": "e1"}), "unknown_event", "type"),
        (json.dumps({"type": "input_audio_buffer.append", "event_id": "e2"}), "invalid_event", "audio"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "!!!", "event_id": "e3"}), "invalid_audio", "audio"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
         "invalid_audio", "audio"),
        (json.dumps({"type": "session.update", "session": {"output_modalities": ["video"]}}), "invalid_event",
         "session.output_modalities.0"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": 8000}}}}}),
         "invalid_event", "session.audio.input.format"),
        (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty", None),
        (json.dumps({"type": "response.cancel"}), "response_cancel_not_active", None),
        (json.dumps({"type": "conversation.item.retrieve", "item_id": "nope", "event_id": "rci_nope"}),
         "item_retrieve_invalid_item_id", "item_id"),
        (json.dumps({"type": "conversation.item.delete", "item_id": "nope"}), "item_delete_invalid_item_id", "item_id"),
        (json.dumps({"type": "conversation.item.create", "previous_item_id": "nope", "item": {"type": "message",
         "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}), "item_create_invalid_previous_item_id",
         "previous_item_id"),
        (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "assistant",
         "content": [{"type": "input_audio", "audio": ""}]}}), "invalid_event", "item"),
        (json.dumps({"type": "response.create", "event_id": "e4"}), "invalid_request", "response"),
        (json.dumps({"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 5}),
         "item_truncate_invalid_item_id", "item_id"),
        ("[" * 5000 + "]" * 5000, "invalid_json", None),
        ('{"a":' * 5000 + "1" + "}" * 5000, "invalid_json", None),
        ('{"type": "input_audio_buffer.commit", "x": ' + "9" * 5000 + "}", "invalid_event", "x"),
        ('{"type": "omnivox.playback", "item_id": "x", "played_ms": 1e400, "event_id": "e5"}', "invalid_event",
         "played_ms"),
        ('{"type": "omnivox.playback", "item_id": "x", "played_ms": ' + "9" * 400 + "}", "invalid_event",
         "played_ms"),
        # json.dumps writes 1e400 as Infinity: not JSON
        (json.dumps({"type": "omnivox.playback", "item_id": "x", "played_ms": 1e400}), "invalid_json", None),
        (json.dumps({"type": "omnivox.playback", "item_id": "x", "played_ms": True}), "invalid_event", "played_ms"),
        (json.dumps({"type": "session.update", "session": {"omnivox": {"interrupt_phrases": ["stop", "!!!"]}}}),
         "invalid_event", "session.omnivox.interrupt_phrases.1"),
        (json.dumps({"type": "session.update", "session": {"instructions": "x" * 70000}}), "invalid_event",
         "session.instructions"),
        (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
         "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}}), "image_not_supported",
         "item.content.0"),
    ],
)  # fmt: skip
def test_bad_input_gets_the_right_error_and_the_session_lives(server: Running, message: str, code: str, param) -> None:
    c = open_client(server)
    c.ws.send(message)
    err = c.recv_until(lambda e: e["type"] == "error")[-1]["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    try:
        sent = json.loads(message) if message.startswith("{") and message.endswith("}") else {}
    except (ValueError, RecursionError):
        sent = {}
    assert err["event_id"] == sent.get("event_id")
    assert c.update(instructions="still alive")["type"] == "session.updated"
    c.ws.close()


def test_response_in_progress(server: Running) -> None:
    c = open_client(server)
    c.update(omnivox={"max_audio_lead_ms": 200})
    c.send(text_item("Hi"))
    c.send({"type": "response.create"})
    c.recv_until(lambda e: e["type"] == "response.created")
    c.send({"type": "response.create"})
    err = c.recv_until(lambda e: e["type"] == "error")[-1]
    assert err["error"]["code"] == "conversation_already_has_active_response"  # OpenAI's code
    c.send({"type": "response.cancel"})
    done = c.recv_until(is_done)[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    c.ws.close()


def test_oversize_frame_closes_with_1009(tiny_ckpt: Path) -> None:
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, max_frame_bytes=64 * 1024,
                                    max_audio_lead_ms=250, interrupt_detector=False, log_level="warning"))  # fmt: skip
    try:
        c = open_client(r)
        # the server's default audio lead is each new session's, until the client sets its own
        assert c.update(omnivox={})["session"]["omnivox"]["max_audio_lead_ms"] == 250
        assert c.update(omnivox={"max_audio_lead_ms": 600})["session"]["omnivox"]["max_audio_lead_ms"] == 600
        c.ws.send("x" * (65 * 1024))
        with pytest.raises(ConnectionClosed) as info:
            c.recv_until(lambda e: False, timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    finally:
        stop_server(r)


def test_disconnect_mid_response_frees_the_runner(server: Running) -> None:
    registry = server.engine.metrics.registry

    def cancelled() -> float:
        return registry.get_sample_value("omnivox_responses_total", {"status": "cancelled"}) or 0.0

    before = cancelled()
    c = open_client(server)
    c.update(omnivox={"max_audio_lead_ms": 100000})
    c.send(text_item("Hi"))
    c.send({"type": "response.create"})
    c.recv_until(lambda e: e["type"] == "response.created")
    c.ws.close()
    deadline = time.monotonic() + 5
    while (server.engine.runner.active_count or server.engine.connections) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.engine.runner.active_count == 0 and not server.engine.connections
    assert cancelled() == before + 1  # counted in omnivox_responses_total too


def test_health_ready_metrics(server: Running) -> None:
    import urllib.request

    base = f"http://127.0.0.1:{server.port}"
    assert urllib.request.urlopen(base + "/healthz").status == 200
    assert json.loads(urllib.request.urlopen(base + "/readyz").read())["status"] == "ready"
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    for name in ("omnivox_active_sessions", "omnivox_responses_total", "omnivox_time_to_first_audio_seconds",
                 "omnivox_decode_steps_per_second", "omnivox_interrupts_total", "omnivox_errors_total"):  # fmt: skip
        assert name in text


def test_auth_and_capacity(tiny_ckpt: Path) -> None:
    import urllib.error
    import urllib.request

    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, api_key="s3cret", max_sessions=1,
                                    interrupt_detector=False, log_level="warning"))  # fmt: skip
    try:
        for kw in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}},
                   {"subprotocols": ["realtime", "openai-insecure-api-key.wrong"]}):  # fmt: skip
            with pytest.raises(InvalidStatus) as info:
                connect(r.url, open_timeout=5, **kw)
            assert info.value.response.status_code == 401
        ok = open_client(r, additional_headers={"Authorization": "Bearer s3cret"})
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(f"http://127.0.0.1:{r.port}/readyz")
        assert http.value.code == 503
        with pytest.raises(InvalidStatus) as info:
            connect(r.url, open_timeout=5, additional_headers={"Authorization": "Bearer s3cret"})
        assert info.value.response.status_code == 503
        ok.ws.close()
        time.sleep(0.3)
        browser = open_client(r, subprotocols=["realtime", "openai-insecure-api-key.s3cret"])
        assert browser.ws.subprotocol == "realtime"
        browser.ws.close()
    finally:
        stop_server(r)


def test_openai_sdk_holds_a_conversation(server: Running) -> None:
    """The official openai SDK's realtime client, pointed at us: a client we did not write."""
    import asyncio

    from openai import AsyncOpenAI

    async def talk() -> tuple[list[str], str]:
        client = AsyncOpenAI(api_key="unused", websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")
        seen: list[str] = []
        transcript = ""
        async with client.realtime.connect(model="gpt-realtime") as conn:
            audio_cfg = {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}
            await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"], "audio": audio_cfg})
            import soxr

            audio24 = soxr.resample(np.concatenate([silence(0.3), fixture_audio("question"), silence(1.0)]),
                                    16000, 24000)  # fmt: skip
            for i in range(0, audio24.size, 4800):
                await conn.input_audio_buffer.append(audio=b64pcm(audio24[i : i + 4800].astype(np.float32)))
            async for event in conn:
                seen.append(event.type)
                if event.type == "response.output_audio_transcript.delta":
                    transcript += event.delta
                if event.type == "response.done":
                    break
        return seen, transcript

    seen, transcript = asyncio.run(asyncio.wait_for(talk(), 60))
    assert seen[0] == "session.created" and "session.updated" in seen
    assert "input_audio_buffer.speech_started" in seen and "response.output_audio.delta" in seen
    assert seen[-1] == "response.done" and transcript
