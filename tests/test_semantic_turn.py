"""Smart Turn v3.2 (semantic_vad's end-of-turn model) on Piper fixtures made by tests/fixtures/make_turn_fixtures.py."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from streaming.config import TurnDetection
from streaming.semantic_turn import (
    SMART_TURN,
    SmartTurn,
    fit_window,
    log_mel,
    smart_turn_onnx_path,
)

from .conftest import FIXTURES

RATE = 16000
AFTER_SPEECH = int(0.2 * RATE)  # pipecat runs Smart Turn once its VAD has heard 0.2 s of silence


@pytest.fixture(scope="module")
def smart_turn() -> SmartTurn:
    return SmartTurn()


def wav(name: str) -> np.ndarray:
    audio, rate = sf.read(FIXTURES / name, dtype="float32")
    assert rate == RATE and audio.ndim == 1
    return audio


def silences(audio: np.ndarray, min_s: float = 0.25) -> list[tuple[int, int]]:
    """(start, length) of each run of digital zeros of at least min_s (the fixtures' silences)."""
    silent = np.diff(np.r_[False, audio == 0, False].astype(np.int8))
    starts, ends = np.flatnonzero(silent == 1), np.flatnonzero(silent == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True) if e - s >= min_s * RATE]


def speech_ends(audio: np.ndarray) -> list[int]:
    return [start for start, _ in silences(audio) if start > 0]


@pytest.mark.parametrize(
    ("name", "gaps_s"),
    [("turn_complete.wav", [0.3, 1.5]), ("turn_pause.wav", [0.3, 1.2, 1.5]), ("turn_incomplete.wav", [0.3, 1.5])],
)
def test_fixture_layout(name: str, gaps_s: list[float]) -> None:
    audio = wav(name)
    found = silences(audio)
    assert found[0][0] == 0 and found[-1][0] + found[-1][1] == len(audio)
    assert [round(n / RATE, 2) for _, n in found] == gaps_s
    assert np.abs(audio).max() > 0.25


def test_pause_starts_with_the_incomplete_fixture() -> None:
    pause, incomplete = wav("turn_pause.wav"), wav("turn_incomplete.wav")
    end = speech_ends(incomplete)[0]
    np.testing.assert_array_equal(pause[:end], incomplete[:end])  # the very same "Hi, I would like to"
    assert speech_ends(pause)[0] == end


def test_complete_question(smart_turn: SmartTurn) -> None:
    audio = wav("turn_complete.wav")
    (end,) = speech_ends(audio)
    assert smart_turn.probability(audio[: end + AFTER_SPEECH]) > 0.5


@pytest.mark.parametrize("name", ["turn_incomplete.wav", "turn_pause.wav"])
def test_incomplete_at_the_pause(smart_turn: SmartTurn, name: str) -> None:
    audio = wav(name)
    end = speech_ends(audio)[0]
    assert smart_turn.probability(audio[:end]) < 0.5
    assert smart_turn.probability(audio[: end + AFTER_SPEECH]) < 0.5


def test_features_equal_pipecats() -> None:
    features = pytest.importorskip("pipecat.audio.turn.smart_turn._whisper_features")
    rng = np.random.default_rng(0)
    speech = wav("turn_pause.wav")
    for audio in [speech, np.tile(speech, 3), rng.uniform(-1, 1, 1000).astype(np.float32), np.zeros(0, np.float32)]:
        ours = log_mel(audio)
        assert ours.shape == (80, 800) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, features.compute_whisper_log_mel_features(fit_window(audio)), atol=1e-5)


def test_window() -> None:
    x = np.arange(1, 10 * RATE + 1, dtype=np.float32)
    assert SMART_TURN.samples == 8 * RATE and SMART_TURN.frames == 800
    np.testing.assert_array_equal(fit_window(x), x[-8 * RATE :])  # the last 8 s
    short = fit_window(x[:RATE])
    assert short[: 7 * RATE].max() == 0 and short[-1] == RATE  # zeros in front
    with pytest.raises(ValueError):
        fit_window(np.zeros((2, RATE), np.float32))


def test_silence_and_empty(smart_turn: SmartTurn) -> None:
    for audio in [np.zeros(0, np.float32), np.zeros(RATE, np.float32), np.zeros(9 * RATE, np.float32)]:
        p = smart_turn.probability(audio)
        assert 0.0 <= p <= 1.0
    assert np.isfinite(log_mel(np.zeros(0, np.float32))).all()


def test_model_file_and_eagerness() -> None:
    assert smart_turn_onnx_path().name == "smart-turn-v3.2-cpu.onnx"
    waits = [TurnDetection(type="semantic_vad", eagerness=e).max_wait_ms for e in ("low", "medium", "high", "auto")]
    assert waits == [8000, 4000, 2000, 4000]  # OpenAI's limits
    with pytest.raises(ValueError):
        TurnDetection(type="semantic_vad", eagerness="eager")
