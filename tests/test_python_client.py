"""The reference Python client against a real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

from clients.python.client import main
from server.settings import ServerSettings

from .conftest import FIXTURES
from .test_server import Running, start_server, stop_server


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[Running]:
    # a small audio lead: the barge-in test's answer is still generating when "stop omni" is heard
    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, api_key="k3y", max_audio_lead_ms=100,
                                    log_level="warning"))  # fmt: skip
    yield r
    stop_server(r)


def _url(r: Running) -> str:
    return f"ws://127.0.0.1:{r.port}/v1/realtime"


def test_client_talks_and_saves_the_answer(server: Running, tmp_path: Path, capsys) -> None:
    out = tmp_path / "answer.wav"
    rc = main([str(FIXTURES / "question.wav"), "--url", _url(server), "--api-key", "k3y", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "end of your turn detected" in printed and "status completed" in printed
    assert "time to first audio" in printed
    audio, rate = sf.read(str(out), dtype="int16")
    assert rate == 24000 and audio.size > 24000


def test_client_barge_in(server: Running, capsys) -> None:
    rc = main([str(FIXTURES / "question.wav"), "--url", _url(server), "--api-key", "k3y",
               "--barge-in", str(FIXTURES / "stop_omni.wav"), "--barge-at", "0.2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0 and "interrupted by" in printed and "status cancelled" in printed


def test_client_errors_are_clear(server: Running, capsys) -> None:
    assert main([str(FIXTURES / "question.wav"), "--url", _url(server), "--api-key", "wrong"]) == 2
    assert "refused the API key (HTTP 401)" in capsys.readouterr().err
    assert main([str(FIXTURES / "question.wav"), "--url", "ws://127.0.0.1:9/v1/realtime"]) == 2
    assert "cannot reach" in capsys.readouterr().err
