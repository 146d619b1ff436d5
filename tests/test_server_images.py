"""Image turns over the WebSocket on a tiny Mini-Omni2 checkpoint: the next audio turn is
answered about the image (tokens as upstream Mini-Omni2's), bad images get `invalid_image`."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.prompts import Task
from server.settings import ServerSettings

from .conftest import FIXTURES, fixture_audio
from .test_server import Client, Running, is_done, open_client, start_server, stop_server

PICTURE = FIXTURES / "picture.png"
UPSTREAM = json.loads((FIXTURES / "upstream_omni2_tiny_seed0.json").read_text())
PTT_16K = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}


@pytest.fixture(scope="module")
def server2(tiny2_ckpt: Path) -> Iterator[Running]:
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny2_ckpt, max_sessions=4, dtype="float32",
                                    log_level="warning"))  # fmt: skip
    yield r
    stop_server(r)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_item(url: str, text: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "input_image", "image_url": url}]
    if text is not None:
        content.append({"type": "input_text", "text": text})
    return {"type": "conversation.item.create", "event_id": "img1",
            "item": {"type": "message", "role": "user", "content": content}}  # fmt: skip


def ask(c: Client) -> list[dict[str, Any]]:
    """Push-to-talk: say the question fixture, commit, ask for the answer and read all of it
    (with omnivox extensions on: response.done then names the task)."""
    c.send({"type": "session.update", "session": {"type": "realtime", "omnivox": {}}})
    q = np.clip(np.round(fixture_audio("question") * 32768), -32768, 32767).astype("<i2").tobytes()
    for i in range(0, len(q), 6400):
        c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(q[i : i + 6400]).decode()})
    c.send({"type": "input_audio_buffer.commit"})
    c.send({"type": "response.create"})
    return c.recv_until(is_done, timeout=60)


def transcript(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta").strip()


def test_an_image_turn_is_answered_about_the_image(server2: Running, tiny2_model) -> None:
    c = open_client(server2)
    assert c.events[0]["session"]["omnivox"]["images"] is True
    assert c.events[0]["session"]["omnivox"]["model_family"] == "mini-omni2"
    c.update(**PTT_16K)
    c.send(image_item(data_url(PICTURE.read_bytes())))
    added = c.recv_until(lambda e: e["type"] == "conversation.item.done")
    assert added[-1]["item"]["content"] == [{"type": "input_image", "detail": "auto"}]

    with_image = ask(c)
    assert with_image[-1]["response"]["omnivox"]["task"] == "image-a1a2"
    text_ids = [t for t in UPSTREAM["list_output"][7] if t < 151936]
    assert transcript(with_image) == tiny2_model.text_of(text_ids)  # upstream Mini-Omni2's own answer
    steps = len(UPSTREAM["list_output"][0])
    pcm = b"".join(base64.b64decode(e["delta"]) for e in with_image if e["type"] == "response.output_audio.delta")
    assert len(pcm) == (steps - 7) * 2048 * 2  # every de-delayed frame, tail included

    # the image went with that turn only: the next question is a plain voice turn
    without = ask(c)
    assert without[-1]["response"]["omnivox"]["task"] == "a1a2"
    result = tiny2_model.start(tiny2_model.prompt(Task.A1A2, audio=fixture_audio("question"))).run()
    assert transcript(without) == tiny2_model.text_of(result.text_tokens) != transcript(with_image)
    c.ws.close()


def test_image_with_text_only_output(server2: Running) -> None:
    c = open_client(server2)
    c.update(**PTT_16K, output_modalities=["text"])
    c.send(image_item(data_url(PICTURE.read_bytes())))
    c.recv_until(lambda e: e["type"] == "conversation.item.done")
    events = ask(c)
    created = next(e for e in events if e["type"] == "response.created")
    assert created["response"]["output_modalities"] == ["text"]
    assert not any(e["type"] == "response.output_audio.delta" for e in events)
    assert any(e["type"] == "response.output_text.delta" for e in events)
    c.ws.close()


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        (data_url(b"this is not an image at all"), "not a PNG"),
        (data_url(PICTURE.read_bytes()[:200]), "could not be decoded"),  # truncated
        (data_url(_png((12000, 12000), mode="1")), "pixels"),  # 144 MP in a few kB: a decompression bomb
        (data_url(PICTURE.read_bytes(), "image/gif"), "unsupported image type"),
        ("https://example.com/cat.png", "remote URLs are not fetched"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("", "needs an image_url"),
    ],
)
def test_bad_images_get_invalid_image_and_the_session_lives(server2: Running, url: str, match: str) -> None:
    c = open_client(server2)
    c.send(image_item(url))
    err = c.recv_until(lambda e: e["type"] == "error")[-1]["error"]
    assert err["code"] == "invalid_image" and err["param"] == "item.content.0.image_url" and err["event_id"] == "img1"
    assert match in err["message"]
    assert c.update(output_modalities=["audio"])["type"] == "session.updated"  # still alive
    c.ws.close()


def test_python_client_sends_an_image(server2: Running, capsys: pytest.CaptureFixture[str]) -> None:
    from clients.python.client import main

    url = f"ws://127.0.0.1:{server2.port}/v1/realtime"
    assert main([str(FIXTURES / "question.wav"), "--url", url, "--image", str(PICTURE)]) == 0
    cap = capsys.readouterr()
    # (that the image steers the answer is shown above, with exact inputs; here the VAD cuts the turn)
    assert "sent the image" in cap.out and "status completed" in cap.out and "server error" not in cap.err
    with pytest.raises(SystemExit):
        main([str(FIXTURES / "question.wav"), "--url", url, "--image", str(FIXTURES / "question.wav")])
