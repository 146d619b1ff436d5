"""OpenAI Realtime behaviour over the wire: conversation items, response options, input
transcription events, G.711 audio, idle timeouts and extension gating. Every event the
clients receive is checked against the `openai` package's types (tests/openai_events.py)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.settings import ServerSettings
from streaming.g711 import ulaw_decode, ulaw_encode

from .conftest import fixture_audio
from .test_server import Client, Running, is_done, open_client, silence, start_server, stop_server, text_item


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[Running]:
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, max_sessions=4, log_level="warning"))
    yield r
    stop_server(r)


def message(role: str, content: list[dict[str, Any]], item_id: str | None = None, **kw: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "message", "role": role, "content": content}
    if item_id is not None:
        item["id"] = item_id
    return {"type": "conversation.item.create", "item": item, **kw}


def seen(c: Client, *kinds: str) -> bool:
    got = {e["type"] for e in c.events}
    return all(k in got for k in kinds)


def added(c: Client) -> dict[str, Any]:
    return c.recv_until(lambda e: e["type"] in ("conversation.item.done", "error"))[-1]


def test_items_keep_their_ids_order_retrieve_and_delete(server: Running) -> None:
    c = open_client(server)
    c.update(turn_detection=None, output_modalities=["text"])
    c.send(message("system", [{"type": "input_text", "text": "Be brief."}], "sys1"))
    assert added(c)["item"]["role"] == "system"
    c.send(message("user", [{"type": "input_text", "text": "What is your name?"}], "u1"))
    done = added(c)
    assert done["item"]["id"] == "u1" and done["previous_item_id"] == "sys1"
    c.send(message("assistant", [{"type": "output_text", "text": "I am omni."}], "a1"))
    assert added(c)["previous_item_id"] == "u1"
    c.send(message("user", [{"type": "input_text", "text": "Hello"}], "u0", previous_item_id="root"))
    assert added(c)["previous_item_id"] is None  # inserted at the start
    c.send(message("user", [{"type": "input_text", "text": "x"}], "u1"))  # the id is taken
    err = c.recv_until(lambda e: e["type"] == "error")[-1]["error"]
    assert err["code"] == "item_create_duplicate_item_id"
    c.send({"type": "conversation.item.retrieve", "item_id": "a1"})
    got = c.recv_until(lambda e: e["type"] == "conversation.item.retrieved")[-1]["item"]
    assert got["role"] == "assistant" and got["content"] == [{"type": "output_text", "text": "I am omni."}]
    # The latest user item with content is answered (u1, not u0 that was put before it), and
    # deleting it makes the next answer fall back to u0.
    c.send({"type": "response.create", "response": {"metadata": {"topic": "names"}}})
    events = c.recv_until(is_done)
    created = next(e for e in events if e["type"] == "response.created")["response"]
    assert created["metadata"] == {"topic": "names"} and events[-1]["response"]["metadata"] == {"topic": "names"}
    assert created["conversation_id"] is not None
    assert any(e["type"] == "conversation.item.added" and e["item"]["role"] == "assistant" for e in events)
    first_prompt = events[-1]["response"]["usage"]["input_tokens"]
    c.send({"type": "conversation.item.delete", "item_id": "u1", "event_id": "del1"})
    assert c.recv_until(lambda e: e["type"] == "conversation.item.deleted")[-1]["item_id"] == "u1"
    c.send({"type": "conversation.item.retrieve", "item_id": "u1"})
    assert c.recv_until(lambda e: e["type"] == "error")[-1]["error"]["code"] == "item_retrieve_invalid_item_id"
    c.send({"type": "response.create"})
    second_prompt = c.recv_until(is_done)[-1]["response"]["usage"]["input_tokens"]
    assert second_prompt < first_prompt  # "Hello" (u0) is answered now, not "What is your name?"
    c.ws.close()


def test_out_of_band_response_with_input_items(server: Running) -> None:
    c = open_client(server)
    c.update(turn_detection=None, output_modalities=["text"])
    c.send(text_item("What is your name?"))
    added(c)
    long_question = "Tell me a long joke about a cat, a dog and a parrot who walk into a bar on a rainy day."
    inline = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": long_question}]}
    c.send({"type": "response.create", "response": {"conversation": "none", "input": [inline],
            "metadata": {"purpose": "classify"}}})  # fmt: skip
    events = c.recv_until(is_done)
    assert not any(e["type"].startswith("conversation.item") for e in events)  # not in the conversation
    done = events[-1]["response"]
    assert done["conversation_id"] is None and done["metadata"] == {"purpose": "classify"}
    c.send({"type": "response.create"})  # the conversation's own latest user item is still what is answered
    conv = c.recv_until(is_done)[-1]["response"]
    # The prompt holds the question: the long inline one was answered out of band, the short one now.
    assert done["usage"]["input_tokens"] > conv["usage"]["input_tokens"] + 10
    c.ws.close()


def test_instructions_alone_are_answered(server: Running) -> None:
    """LiveKit's generate_reply(instructions=...) sends response.create with no user item."""
    c = open_client(server)
    c.update(output_modalities=["text"])
    c.send({"type": "response.create", "response": {"instructions": "Greet the user."}})
    events = c.recv_until(is_done)
    assert events[-1]["response"]["status"] == "completed"
    assert not any(e["type"] == "error" for e in events)
    c.ws.close()


def test_input_transcription_events(server: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    c = open_client(server)
    audio = {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "transcription": {"model": "gpt-4o-transcribe"}}}
    upd = c.update(output_modalities=["text"], audio=audio)  # text: no playback to barge into
    assert upd["session"]["audio"]["input"]["transcription"]["model"] == "faster-whisper-tiny.en"
    c.speak(np.concatenate([silence(0.3), fixture_audio("weather"), silence(0.8)]))
    events = c.recv_until(lambda e: seen(c, "conversation.item.input_audio_transcription.completed", "response.done"))
    item = next(e for e in events if e["type"] == "input_audio_buffer.committed")["item_id"]
    delta = next(e for e in events if e["type"] == "conversation.item.input_audio_transcription.delta")
    done = next(e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed")
    assert delta["item_id"] == done["item_id"] == item and delta["delta"] == done["transcript"]
    assert "weather" in done["transcript"].lower()
    assert done["usage"]["type"] == "duration" and 1.5 < done["usage"]["seconds"] < 4
    c.send({"type": "conversation.item.retrieve", "item_id": item})
    got = c.recv_until(lambda e: e["type"] == "conversation.item.retrieved")[-1]["item"]
    assert got["content"][0]["transcript"] == done["transcript"]

    def broken(audio: Any, prompt: Any) -> str:
        raise RuntimeError("the recognizer fell over")

    assert server.engine.recognizer is not None
    monkeypatch.setattr(server.engine.recognizer.recognizer, "transcribe", broken)
    c.events.clear()
    c.speak(np.concatenate([silence(0.3), fixture_audio("weather"), silence(0.8)]))
    c.recv_until(lambda e: seen(c, "conversation.item.input_audio_transcription.failed", "response.done"))
    failed = next(e for e in c.events if e["type"] == "conversation.item.input_audio_transcription.failed")
    assert failed["error"]["code"] == "transcription_failed"  # and the turn is still answered
    c.ws.close()


def test_g711_both_ways(server: Running) -> None:
    import soxr

    c = open_client(server)
    fmt = {"type": "audio/pcmu"}
    upd = c.update(audio={"input": {"format": fmt}, "output": {"format": fmt}}, omnivox={})
    assert upd["session"]["audio"]["input"]["format"] == fmt == upd["session"]["audio"]["output"]["format"]
    q8 = soxr.resample(np.concatenate([silence(0.3), fixture_audio("question"), silence(0.8)]), 16000, 8000)
    data = ulaw_encode(q8.astype(np.float32))
    for i in range(0, len(data), 1600):
        c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(data[i : i + 1600]).decode()})
    events = c.recv_until(is_done)
    out = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["omnivox"]["audio_ms"] > 0
    assert len(out) == pytest.approx(done["omnivox"]["audio_ms"] * 8, abs=2)  # one byte a sample at 8 kHz, all of it
    assert np.max(np.abs(ulaw_decode(out))) > 0.01  # the answer is there, not silence
    c.ws.close()


def test_a_stock_client_gets_no_extensions(server: Running) -> None:
    """No omnivox option sent: a barge-in still works, but no omnivox.* event or field comes
    (each received event is checked: tests/openai_events.py)."""
    c = open_client(server)
    c.update(audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}})
    c.speak(np.concatenate([silence(0.3), fixture_audio("question"), silence(0.8)]))
    c.recv_until(lambda e: e["type"] == "response.output_audio.delta")
    c.speak(np.concatenate([fixture_audio("stop_omni"), silence(0.7)]), chunk=512)
    done = c.recv_until(is_done, timeout=15)[-1]["response"]
    assert done["status"] == "cancelled" and "omnivox" not in done
    assert not any(e["type"].startswith("omnivox.") for e in c.events)
    c.ws.close()


def test_idle_timeout_triggers_an_answer(server: Running) -> None:
    c = open_client(server)
    td = {"type": "server_vad", "idle_timeout_ms": 5000}
    upd = c.update(output_modalities=["text"], audio={"input": {"format": {"type": "audio/pcm", "rate": 16000},
                   "turn_detection": td}})  # fmt: skip
    assert upd["session"]["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 5000
    c.send(text_item("Hello"))
    c.send({"type": "response.create"})
    c.recv_until(is_done)
    t0 = time.monotonic()
    for _ in range(7):  # the microphone streams silence
        c.speak(silence(1.0), chunk=16000)
        time.sleep(1.0)
        if any(e["type"] == "input_audio_buffer.timeout_triggered" for e in c.events):
            break
    events = c.recv_until(is_done, timeout=10)
    trig = next(e for e in c.events if e["type"] == "input_audio_buffer.timeout_triggered")
    assert 4.9 < time.monotonic() - t0 and trig["audio_end_ms"] - trig["audio_start_ms"] == 5000
    committed = [e["item_id"] for e in c.events if e["type"] == "input_audio_buffer.committed"]
    assert committed == [trig["item_id"]] and events[-1]["response"]["status"] == "completed"
    c.ws.close()
