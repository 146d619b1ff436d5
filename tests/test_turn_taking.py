"""semantic_vad with the Smart Turn model, idle timeouts, G.711 input and barge-in verdicts tied
to their response: sessions on the tiny checkpoint, driven directly (no sockets)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from streaming.config import SessionConfig, TurnDetection
from streaming.driver import LocalSession
from streaming.events import (
    Event,
    InputCommitted,
    InputTimeout,
    ResponseCreated,
    ResponseDone,
    SpeechStopped,
)
from streaming.g711 import ulaw_encode
from streaming.runner import ModelRunner

from .conftest import fixture_audio
from .test_session import collect, done, feed, silence


@pytest.fixture(scope="module")
def smart_turn():
    from streaming.semantic_turn import SmartTurn

    return SmartTurn()


def speech_bounds(audio: np.ndarray) -> tuple[float, float]:
    """First and last loud sample of a fixture, in seconds."""
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return loud[0] / 16000, loud[-1] / 16000


def commits(events: list[Event]) -> list[InputCommitted]:
    return [e for e in events if isinstance(e, InputCommitted)]


def semantic(eagerness: str = "auto") -> TurnDetection:
    return TurnDetection(type="semantic_vad", eagerness=eagerness, create_response=False)


def test_semantic_vad_ends_a_finished_question_early(runner: ModelRunner, vad, smart_turn) -> None:
    q = fixture_audio("turn_complete")
    _, end = speech_bounds(q)
    upto = int((end + 0.45) * 16000)  # the speech and 450 ms of its silence (silero lags the speech by ~0.1 s)
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000, turn_detection=semantic()),
                turn_model=smart_turn)  # fmt: skip
    feed(s, q[:upto], chunk=512)
    events = s.poll()
    (stopped,) = [e for e in events if isinstance(e, SpeechStopped)]
    assert len(commits(events)) == 1 and abs(stopped.audio_end_ms / 1000 - end) < 0.15
    # server_vad's 500 ms of silence has not run out at the same point.
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000,
                turn_detection=TurnDetection(create_response=False)))  # fmt: skip
    feed(s, q[:upto], chunk=512)
    assert commits(s.poll()) == []


@pytest.mark.parametrize("eagerness, wait_s", [("high", 2.0), ("auto", 4.0)])
def test_semantic_vad_waits_through_a_mid_sentence_pause(
    runner: ModelRunner, vad, smart_turn, eagerness: str, wait_s: float
) -> None:
    """'Hi, I would like to ... [1.2 s] ... order a pizza.' is one turn; server_vad cuts it at the pause."""
    audio = np.concatenate([fixture_audio("turn_pause"), silence(wait_s + 0.5)])
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000, turn_detection=semantic(eagerness)),
                turn_model=smart_turn)  # fmt: skip
    feed(s, audio, chunk=512)
    (turn,) = commits(s.poll())
    assert turn.duration_ms > 3300  # both halves and the pause between them
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000,
                turn_detection=TurnDetection(create_response=False)))  # fmt: skip
    feed(s, audio, chunk=512)
    assert len(commits(s.poll())) == 2


def test_semantic_vad_without_its_model_falls_back_to_silence(runner: ModelRunner, vad) -> None:
    q = np.concatenate([fixture_audio("turn_pause"), silence(0.2)])
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000, turn_detection=semantic()))
    feed(s, q, chunk=512)
    assert len(commits(s.poll())) == 2  # 500 ms of silence ends each half


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_idle_timeout_answers_the_silence(runner: ModelRunner, vad) -> None:
    clock = FakeClock()
    td = TurnDetection(idle_timeout_ms=5000)
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000, turn_detection=td,
                output_modalities=("text",), max_new_tokens=4), clock=clock)  # fmt: skip
    feed(s, silence(1.0))
    clock.t += 10
    assert s.poll() == []  # no answer yet: the timeout counts from the end of the last answer
    s.add_text("Hello", create_response=True)
    collect(s, done)
    feed(s, silence(6.0))
    clock.t += 4.9
    assert s.poll() == []
    clock.t += 0.2
    events = collect(s, done)
    timeout = events[0]
    assert isinstance(timeout, InputTimeout) and timeout.audio_end_ms - timeout.audio_start_ms == 5000
    assert isinstance(events[1], InputCommitted) and events[1].item_id == timeout.item_id
    assert isinstance(events[2], ResponseCreated)
    clock.t += 4.0
    assert not any(isinstance(e, InputTimeout) for e in s.poll())  # once per silence, not every poll


def test_g711_input_is_heard_like_pcm(runner: ModelRunner, vad) -> None:
    import soxr

    q8 = soxr.resample(np.concatenate([silence(0.3), fixture_audio("question"), silence(1.0)]), 16000, 8000)
    cfg = SessionConfig(input_format="audio/pcmu", input_sample_rate=8000,
                        turn_detection=TurnDetection(create_response=False))  # fmt: skip
    s = LocalSession(runner, vad, None, cfg)
    data = ulaw_encode(q8.astype(np.float32))
    for i in range(0, len(data), 160):  # 20 ms telephony packets, one byte a sample
        s.append_audio(data[i : i + 160])
    (turn,) = commits(s.poll())
    assert 1200 < turn.duration_ms < 2000
    with pytest.raises(ValueError):
        SessionConfig(input_format="audio/pcmu", input_sample_rate=16000)


class HeldRecognizer:
    """A command recognizer whose verdicts the test hands out when it likes."""

    def __init__(self) -> None:
        self.pending: list[Callable[[str | None], None]] = []

    def submit(self, audio, prompt, callback: Callable[[str | None], None], droppable=False, urgent=False) -> bool:
        self.pending.append(callback)
        return True


def test_a_late_stop_verdict_does_not_cancel_the_next_response(runner: ModelRunner, vad) -> None:
    recognizer = HeldRecognizer()
    s = LocalSession(runner, vad, recognizer, SessionConfig(input_sample_rate=16000, max_audio_lead_ms=100))  # type: ignore[arg-type]
    s.add_text("Tell me a long story about the weather.", create_response=True)
    collect(s, lambda ev: any(isinstance(e, ResponseCreated) for e in ev))
    feed(s, np.concatenate([fixture_audio("stop_omni"), silence(0.7)]))  # heard while A speaks
    assert recognizer.pending
    s.cancel_response("client_cancelled")  # the client moves on before the verdict comes
    collect(s, done)  # A's end (from the runner, within a step)
    s.report_playback(1e9)  # nothing of A is left to play
    b = s.add_text("What is your name?", create_response=True) and s.response
    assert b is not None
    for verdict in recognizer.pending:
        verdict("stop omni")
    time.sleep(0.1)
    events = collect(s, done)
    (end,) = [e for e in events if isinstance(e, ResponseDone)]
    assert end.response_id == b.response_id and end.status == "completed"
