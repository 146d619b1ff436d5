"""The engine's shape: a sans-I/O session under a fake clock, failures that end only the response
they touched (fault injection in every stage), a loop that a slow recognizer never holds up, and
send buffers bounded in bytes."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.settings import ServerSettings
from streaming.config import InterruptMode, SessionConfig, TurnDetection
from streaming.driver import LocalSession
from streaming.events import (
    AudioChunk,
    CancelResponse,
    ConfirmResponse,
    InputCommitted,
    InputTranscript,
    Interrupted,
    PlaybackAt,
    ResponseCreated,
    ResponseDone,
    SessionError,
    SpeechStarted,
    SpeechStopped,
    StartResponse,
    Transcribe,
    TranscriptDelta,
)
from streaming.runner import SERVER_ERROR_MESSAGE, ModelRunner, ResponseStream
from streaming.session import Session

from .test_server import Running, open_client, stop_server
from .test_session import collect, done

# ---------------- the session alone: inputs in, events and work out ----------------

SPEECH, QUIET = [0.9] * 20, [0.0] * 20  # VAD probabilities of 20 windows (640 ms)


def audio_for(probs: list[float]) -> np.ndarray:
    return np.zeros(512 * len(probs), np.float32)


def speak(s: Session, probs: list[float], now: float) -> None:
    s.receive_audio(audio_for(probs), probs, now)


def started(s: Session) -> StartResponse:
    (work,) = [w for w in s.take_work() if isinstance(w, StartResponse)]
    return work


def test_session_is_a_deterministic_state_machine() -> None:
    """No runner, no threads, no clock: a turn, its response's events, a cancel."""
    s = Session(SessionConfig(input_sample_rate=16000))
    speak(s, QUIET[:5] + SPEECH + QUIET, now=10.0)
    events = s.take_events()
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped, InputCommitted, ResponseCreated]
    assert events[0].audio_start_ms == 160 and events[1].audio_end_ms == 800
    work = started(s)
    assert work.request.task.value == "a1a2" and work.request.audio.size == 800 * 16  # from the input's start
    rid = work.response_id
    # The runner's events go in; the session forwards them and starts the playback clock.
    s.response_event(TranscriptDelta(rid, work.item_id, "Hi"), now=11.0)
    s.response_event(AudioChunk(rid, work.item_id, 0, 0.0, b"\0\0" * 2400), now=11.0)
    assert s.take_work() == [PlaybackAt(rid, 11.0)]
    assert s.speaking_at(11.05)
    assert s.cancel_response("client_cancelled") and s.take_work() == [CancelResponse(rid, "client_cancelled")]
    s.response_event(AudioChunk(rid, work.item_id, 1, 100.0, b"\0\0" * 2400), now=11.1)  # in flight: dropped
    s.response_event(ResponseDone(rid, work.item_id, "cancelled", "client_cancelled", transcript="Hi there"), 11.2)
    events = s.take_events()
    assert [type(e) for e in events] == [TranscriptDelta, AudioChunk, ResponseDone]
    end = events[-1]
    assert isinstance(end, ResponseDone) and end.status == "cancelled"
    assert end.transcript == "Hi" and end.audio_ms == pytest.approx(100.0)  # what the client got
    assert s.response is None and not s.speaking_at(11.2)


def test_stop_rules_reach_the_runners_request() -> None:
    """A benchmark's session may run answers to their whole budget (random weights end them
    early); the default keeps the model's end-of-audio and end-of-text."""
    for rules in (True, False):
        s = Session(SessionConfig(turn_detection=None, stop_rules=rules))
        s.add_text("hi", now=0.0, create_response=True)
        assert started(s).request.stop_rules is rules
    assert SessionConfig().stop_rules


def test_a_response_asked_for_while_one_is_being_cancelled_starts_after_its_end() -> None:
    s = Session(SessionConfig(turn_detection=None))
    s.add_text("one", now=0.0, create_response=True)
    first = started(s)
    s.cancel_response()
    second = s.add_text("two", now=0.1, create_response=True)
    assert second and not [w for w in s.take_work() if isinstance(w, StartResponse)]
    s.response_event(ResponseDone(first.response_id, first.item_id, "cancelled", "client_cancelled"), now=0.2)
    events = s.take_events()
    assert [type(e) for e in events] == [ResponseCreated, ResponseDone, ResponseCreated]
    assert started(s).request.text == "two"


def test_a_stale_verdict_is_dropped() -> None:
    """A recognizer verdict about speech heard during answer A never cancels answer B."""
    cfg = SessionConfig(input_sample_rate=16000, interrupt_mode=InterruptMode.COMMAND, max_audio_lead_ms=100)
    s = Session(cfg, recognizer=True)
    s.add_text("A", now=0.0, create_response=True)
    a = started(s)
    s.response_event(AudioChunk(a.response_id, a.item_id, 0, 0.0, b"\0\0" * 24000), now=0.0)  # 1 s playing
    speak(s, SPEECH + QUIET, now=0.1)
    asks = [w for w in s.take_work() if isinstance(w, Transcribe)]
    assert len(asks) >= 2 and asks[0].droppable and not asks[-1].droppable  # partial checks, then the final one
    s.cancel_response()
    s.response_event(ResponseDone(a.response_id, a.item_id, "cancelled", "client_cancelled"), now=0.2)
    s.report_playback(1e9, now=0.2)
    s.add_text("B", now=0.3, create_response=True)
    started(s)
    for ask in asks:
        s.recognized(ask.ticket, "stop omni", now=0.4)
    assert not any(isinstance(e, Interrupted) for e in s.take_events())
    assert s.response is not None and s.response.cancelled is None


def test_one_partial_command_check_at_a_time() -> None:
    """While a partial check of the speech is with the recognizer, the growing speech asks for
    no other (a queue of them would hold up the final check on a slow recognizer); its verdict
    lets the next one go; the final check goes when the speech ends, whatever is out."""
    cfg = SessionConfig(input_sample_rate=16000, interrupt_mode=InterruptMode.COMMAND, max_audio_lead_ms=100)
    s = Session(cfg, recognizer=True)
    a = _answering(s, audio_s=10.0)
    speak(s, SPEECH, now=0.5)
    (first,) = [w for w in s.take_work() if isinstance(w, Transcribe)]
    assert first.droppable and first.command
    speak(s, SPEECH, now=0.6)  # 0.64 s more, two check intervals: the first is still out
    assert not [w for w in s.take_work() if isinstance(w, Transcribe)]
    s.recognized(first.ticket, "well I", now=0.6)  # no command yet
    speak(s, SPEECH[:1], now=0.7)
    (second,) = [w for w in s.take_work() if isinstance(w, Transcribe)]
    assert second.droppable and second.audio.size > first.audio.size  # the speech so far
    speak(s, QUIET, now=0.8)  # the speech ends with the second still out
    final = _final_check(s)
    assert final.command and final.audio.size >= second.audio.size
    s.recognized(final.ticket, "Stop omni.", now=0.9)
    assert any(isinstance(e, Interrupted) and e.response_id == a.response_id for e in s.take_events())


def test_a_command_is_checked_at_the_first_pause() -> None:
    """A short silence after the speech (speculate_after_ms) sends its check at once: "stop
    omni" interrupts before the silence could end the utterance. If the silence does end it
    there, that check is the final one (no second call over the same audio)."""
    cfg = SessionConfig(input_sample_rate=16000, interrupt_mode=InterruptMode.COMMAND, max_audio_lead_ms=100)
    assert cfg.speculate_after_ms == 160
    for verdict in ("Stop omni.", "It is a long question about the weather."):
        s = Session(cfg, recognizer=True)
        a = _answering(s, audio_s=10.0)
        speak(s, SPEECH * 2 + QUIET[:6], now=0.5)  # 192 ms of silence: a pause, not yet the end
        asks = [w for w in s.take_work() if isinstance(w, Transcribe)]
        at_pause = asks[-1]
        assert not at_pause.droppable and at_pause.audio.size == 2 * len(SPEECH) * 512  # the speech, whole
        if verdict == "Stop omni.":
            s.recognized(at_pause.ticket, verdict, now=0.6)
            events = s.take_events()
            assert any(isinstance(e, Interrupted) and e.response_id == a.response_id for e in events)
            continue
        speak(s, QUIET, now=0.7)  # the silence lasts: the utterance ended at the pause
        assert not [w for w in s.take_work() if isinstance(w, Transcribe)]  # no second check
        s.recognized(at_pause.ticket, verdict, now=0.8)  # no command: its verdict is the final one
        s.response_event(ResponseDone(a.response_id, a.item_id, "completed"), now=0.9)
        s.report_playback(1e9, now=11.0)
        s.tick(11.0)  # the answer is over: the question held meanwhile is the next turn
        assert any(isinstance(e, InputCommitted) for e in s.take_events())


class GatedRecognizer:
    """Records its calls (by prompt); those whose prompt starts with "t" or "w" wait for `gate`."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[str | None] = []

    def transcribe(self, audio: np.ndarray, prompt: str | None = None) -> str:
        self.calls.append(prompt)
        if (prompt or "")[:1] in ("t", "w"):
            self.gate.wait(10)
        return prompt or ""


class GatedTwoCopies(GatedRecognizer):
    """With a command path of its own (recorded as the plain one): two calls at once."""

    def transcribe_command(self, audio: np.ndarray, prompt: str | None = None) -> str:
        return self.transcribe(audio, prompt)


def _submit(worker: Any, name: str, urgent: bool) -> threading.Event:
    heard = threading.Event()
    worker.submit(np.zeros(1600, np.float32), name, lambda _text: heard.set(), urgent=urgent)
    return heard


def test_command_checks_take_the_recognizers_command_path() -> None:
    """A recognizer with a command path (faster-whisper's two-thread copy) gets the command
    checks there, the transcripts on its plain path."""
    from streaming.detector import RecognizerWorker

    class TwoPaths(GatedRecognizer):
        def transcribe_command(self, audio: np.ndarray, prompt: str | None = None) -> str:
            self.calls.append(f"command:{prompt}")
            return "command"

    asr = TwoPaths()
    worker = RecognizerWorker(asr)
    try:
        heard = [_submit(worker, "x1", urgent=False), _submit(worker, "x2", urgent=True)]
        assert all(h.wait(10) for h in heard)
        assert sorted(asr.calls) == ["command:x2", "x1"]
    finally:
        worker.close()


def test_command_checks_go_ahead_of_transcripts() -> None:
    """One call at a time: command checks (a barge-in waits on them) go before the transcripts
    that were waiting, in order among themselves."""
    from streaming.detector import RecognizerWorker

    asr = GatedRecognizer()
    worker = RecognizerWorker(asr)
    try:
        assert worker.lanes == 1
        first = _submit(worker, "t0", urgent=False)
        time.sleep(0.2)  # "t0" is being transcribed: the others wait
        heard = [_submit(worker, name, name.startswith("c")) for name in ("t1", "c1", "t2", "c2")]
        assert not first.is_set()
        asr.gate.set()
        assert all(h.wait(10) for h in heard)
        assert asr.calls == ["t0", "c1", "c2", "t1", "t2"]
    finally:
        worker.close()


def test_a_command_check_never_waits_for_a_transcript() -> None:
    """A recognizer with a command path of its own: a command check runs while a transcript is
    being made, the commands' thread leaves the waiting transcripts to the other one, and
    two checks never run at once (they would share the cores: the first verdict comes later)."""
    from streaming.detector import RecognizerWorker

    asr = GatedTwoCopies()
    worker = RecognizerWorker(asr)
    try:
        assert worker.lanes == 2
        transcripts = [_submit(worker, name, urgent=False) for name in ("t1", "t2")]
        for _ in range(100):  # until "t1" is being made
            if asr.calls:
                break
            time.sleep(0.01)
        command = _submit(worker, "c1", urgent=True)
        assert command.wait(5)  # while "t1" still waits for the gate
        time.sleep(0.2)
        assert asr.calls == ["t1", "c1"] and not any(t.is_set() for t in transcripts)
        asr.gate.set()
        assert all(t.wait(10) for t in transcripts)
        assert asr.calls == ["t1", "c1", "t2"]
        asr.gate.clear()
        checks = [_submit(worker, name, urgent=True) for name in ("w1", "c2")]
        time.sleep(0.3)  # the transcripts' thread is idle meanwhile
        assert asr.calls[3:] == ["w1"] and not any(c.is_set() for c in checks)
        asr.gate.set()
        assert all(c.wait(10) for c in checks)
        assert asr.calls[3:] == ["w1", "c2"]
    finally:
        worker.close()


def test_semantic_vad_score_comes_back_as_an_input() -> None:
    from streaming.events import ScoreTurn

    td = TurnDetection(type="semantic_vad", create_response=False)
    s = Session(SessionConfig(input_sample_rate=16000, turn_detection=td), turn_model=True)
    speak(s, SPEECH + [0.0] * 9, now=0.0)  # 288 ms of silence: the model is asked once
    (ask,) = [w for w in s.take_work() if isinstance(w, ScoreTurn)]
    assert not any(isinstance(e, InputCommitted) for e in s.take_events())
    s.turn_scored(ask.ticket, 0.97, now=0.1)  # complete: the turn ends where the silence began
    (committed,) = [e for e in s.take_events() if isinstance(e, InputCommitted)]
    assert committed.duration_ms == 640  # the speech (its prefix padding is clipped at the input's start)
    s.turn_scored(ask.ticket, 0.97, now=0.2)  # an answer comes once; a repeat is ignored
    assert s.take_events() == []


# ---------------- speculative encode and prefill ----------------


def test_the_answer_starts_at_the_first_silent_window_and_goes_on_at_the_turn_end() -> None:
    s = Session(SessionConfig(input_sample_rate=16000, speculate_after_ms=0))
    speak(s, QUIET[:5] + SPEECH + [0.0], now=0.0)  # the first silent window
    (spec,) = s.take_work()
    assert isinstance(spec, StartResponse) and spec.speculative
    assert [type(e) for e in s.take_events()] == [SpeechStarted]  # nothing announced yet
    speak(s, QUIET, now=0.5)  # the silence lasts: the turn ends where the speculation assumed
    (confirm,) = s.take_work()
    assert isinstance(confirm, ConfirmResponse) and confirm.response_id == spec.response_id
    assert confirm.item_id == spec.item_id and confirm.request is spec.request
    events = s.take_events()
    assert [type(e) for e in events] == [SpeechStopped, InputCommitted, ResponseCreated]
    assert events[2].response_id == spec.response_id and s.responding == spec.response_id
    assert spec.request.audio.size == events[1].duration_ms * 16  # exactly the committed audio


def test_speech_that_resumes_drops_the_speculation() -> None:
    s = Session(SessionConfig(input_sample_rate=16000, speculate_after_ms=0))
    speak(s, QUIET[:5] + SPEECH + [0.0] * 3, now=0.0)  # a 96 ms pause inside the turn
    (first,) = s.take_work()
    speak(s, SPEECH, now=0.2)  # the user goes on
    assert s.take_work() == [CancelResponse(first.response_id, "speculation_dropped")]
    speak(s, QUIET, now=1.0)
    second, confirm = s.take_work()
    assert isinstance(second, StartResponse) and second.speculative and second.response_id != first.response_id
    assert isinstance(confirm, ConfirmResponse) and confirm.response_id == second.response_id
    assert second.request.audio.size == (160 + 640 + 96 + 640) * 16  # the whole turn, from its start
    created = [e for e in s.take_events() if isinstance(e, ResponseCreated)]
    assert [e.response_id for e in created] == [second.response_id]


def test_a_turn_that_is_not_answered_at_once_drops_the_speculation() -> None:
    """create_response false, a client commit, a clear, a config change: no confirm comes."""
    for ending in ("no_create", "commit", "clear", "update"):
        td = TurnDetection(create_response=ending != "no_create")
        s = Session(SessionConfig(input_sample_rate=16000, turn_detection=td, speculate_after_ms=0))
        speak(s, [*SPEECH, 0.0], now=0.0)
        spec = [w for w in s.take_work() if isinstance(w, StartResponse)]
        if ending == "no_create":
            assert spec == []  # nothing to speculate on
            continue
        if ending == "commit":
            s.commit(now=0.1)
        elif ending == "clear":
            s.clear()
        else:
            s.update(s.config.replace(max_new_tokens=5))
        speak(s, QUIET, now=1.0)
        work = s.take_work()
        assert CancelResponse(spec[0].response_id, "speculation_dropped") in work, ending
        assert not any(isinstance(w, ConfirmResponse) for w in work), ending


def test_without_speculation_the_answer_starts_at_the_turn_end() -> None:
    s = Session(SessionConfig(input_sample_rate=16000, speculate_after_ms=None))
    speak(s, SPEECH + [0.0] * 10, now=0.0)
    assert s.take_work() == []
    speak(s, QUIET, now=0.5)
    (work,) = s.take_work()
    assert isinstance(work, StartResponse) and not work.speculative


def test_a_closed_session_lets_its_audio_go_even_inside_a_reference_cycle() -> None:
    """Connections sit in reference cycles (their tasks, their driver's callbacks) that only a
    rare full collection frees: a 20-minute soak grew ~100 MB that way. Close frees the audio."""
    import gc
    import weakref

    gc.disable()
    try:
        s = Session(SessionConfig(input_sample_rate=16000))
        owner = {"session": s}
        owner["self"] = owner  # a cycle holding the session
        message = np.ones(16000 * 5, np.float32)
        s.add_audio(message)
        speak(s, SPEECH * 3, now=0.0)  # a turn in progress: its audio is in the history
        gone = weakref.ref(message)
        history = weakref.ref(s._history._buf)
        del message
        s.close()
        assert gone() is None and history() is None
    finally:
        gc.enable()


# ---------------- speech at the edge of an answer (command and none modes) ----------------


def _answering(s: Session, audio_s: float) -> StartResponse:
    """A text turn answered with `audio_s` of audio, all sent at t=0 (it plays until audio_s)."""
    s.add_text("hello", now=0.0, create_response=True)
    a = started(s)
    s.response_event(AudioChunk(a.response_id, a.item_id, 0, 0.0, b"\0\0" * int(24000 * audio_s)), now=0.0)
    s.take_events()
    s.take_work()
    return a


def _end(s: Session, a: StartResponse, now: float) -> None:
    s.response_event(ResponseDone(a.response_id, a.item_id, "completed"), now=now)


def _final_check(s: Session) -> Transcribe:
    asks = [w for w in s.take_work() if isinstance(w, Transcribe)]
    assert asks and not asks[-1].droppable
    return asks[-1]


def test_a_question_asked_during_the_answer_is_answered_after_it() -> None:
    """Command mode: 1.28 s of speech that is no command, said while the answer plays, is the
    next user turn once the answer's audio is over, from its first sample."""
    s = Session(SessionConfig(input_sample_rate=16000), recognizer=True)
    a = _answering(s, audio_s=5.0)
    speak(s, QUIET + SPEECH * 2 + QUIET, now=1.0)  # 640 ms quiet, 1280 ms speech, 640 ms quiet
    s.recognized(_final_check(s).ticket, "what is the weather like", now=1.1)
    _end(s, a, now=2.0)
    s.take_events()
    assert s.next_deadline() == pytest.approx(5.0)  # when the answer's audio is over
    s.tick(4.9)
    assert s.take_events() == [] and not s.take_work()
    s.tick(5.0)
    events = s.take_events()
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped, InputCommitted, ResponseCreated]
    assert events[0].item_id == events[1].item_id == events[2].item_id
    assert (events[0].audio_start_ms, events[1].audio_end_ms) == (640, 1920)
    request = started(s).request
    assert request.audio.size == (1920 - 640 + 300) * 16  # the speech and its prefix padding


def test_a_backchannel_or_a_command_during_the_answer_is_not_a_turn() -> None:
    for probs, heard in ((QUIET + SPEECH[:13] + QUIET, "yeah"), (QUIET + SPEECH * 2 + QUIET, "stop omni")):
        s = Session(SessionConfig(input_sample_rate=16000), recognizer=True)
        a = _answering(s, audio_s=5.0)
        speak(s, probs, now=1.0)
        s.recognized(_final_check(s).ticket, heard, now=1.1)
        if heard == "stop omni":
            assert any(isinstance(e, Interrupted) for e in s.take_events())
            s.response_event(ResponseDone(a.response_id, a.item_id, "cancelled", "turn_detected"), now=1.2)
        else:
            _end(s, a, now=2.0)
        s.take_events()
        s.tick(10.0)
        assert not [e for e in s.take_events() if isinstance(e, (InputCommitted, ResponseCreated))], heard
        assert not [w for w in s.take_work() if isinstance(w, StartResponse)]


def test_speech_that_goes_on_past_the_answer_is_the_next_turn() -> None:
    """Speech begun while the answer's last 300 ms play and still going when they end is a
    turn from its first sample; a late command verdict about it drops it instead."""
    for verdict in ("so tell me more", "stop"):
        s = Session(SessionConfig(input_sample_rate=16000), recognizer=True)
        a = _answering(s, audio_s=2.0)
        _end(s, a, now=1.0)
        speak(s, QUIET + SPEECH[:10], now=1.7)  # 640 ms quiet, speech from 640 ms
        asks = [w for w in s.take_work() if isinstance(w, Transcribe)]
        assert not any(isinstance(e, SpeechStarted) for e in s.take_events())  # a barge-in so far
        speak(s, SPEECH[:10], now=2.05)  # the answer's audio is over; the speech goes on
        (began,) = s.take_events()
        assert isinstance(began, SpeechStarted) and began.audio_start_ms == 640
        for ask in asks:
            s.recognized(ask.ticket, verdict, now=2.1)
        speak(s, QUIET, now=2.4)
        kinds = [type(e) for e in s.take_events()]
        if verdict == "stop":
            assert kinds == [SpeechStopped]  # said as the answer ended: a command, not a question
        else:
            assert kinds == [SpeechStopped, InputCommitted, ResponseCreated]
            assert started(s).request.audio.size == (1280 - 640 + 300) * 16


def test_without_interrupts_a_long_utterance_is_still_answered_after_the_answer() -> None:
    s = Session(SessionConfig(input_sample_rate=16000, interrupt_mode=InterruptMode.NONE))
    a = _answering(s, audio_s=5.0)
    speak(s, QUIET + SPEECH * 2 + QUIET, now=1.0)  # no recognizer, no verdict to wait for
    _end(s, a, now=2.0)
    s.take_events()
    s.tick(5.0)
    assert [type(e) for e in s.take_events()] == [SpeechStarted, SpeechStopped, InputCommitted, ResponseCreated]


# ---------------- failures stay inside one response ----------------


def _install_fault(stage: str, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Break `stage` for the response to the text "poison" only."""
    if stage == "encode":
        real_prompt = model.prompt

        def prompt(task, **kw):  # type: ignore[no-untyped-def]
            if kw.get("text") == "poison":
                raise RuntimeError("secret internals of the encoder")
            return real_prompt(task, **kw)

        monkeypatch.setattr(model, "prompt", prompt)
        return
    poisoned: set[int] = set()
    real_start = model.start

    def start(prompt, *args, **kw):  # type: ignore[no-untyped-def]
        gen = real_start(prompt, *args, **kw)
        if _is_poison(model, prompt):
            poisoned.add(id(gen.cache))
            if stage == "prefill":

                def step() -> None:
                    raise RuntimeError("secret internals of the prefill")

                gen.step = step  # type: ignore[method-assign]
        return gen

    monkeypatch.setattr(model, "start", start)
    if stage == "step":
        real_forward = model.llm.hidden_batched

        def forward(embeds, groups):  # type: ignore[no-untyped-def]
            if embeds.shape[1] == 1 and any(id(g.cache) in poisoned for g in groups):  # decode steps only
                raise RuntimeError("secret internals of a decode step")
            return real_forward(embeds, groups)

        monkeypatch.setattr(model.llm, "hidden_batched", forward)
    elif stage == "snac":
        import streaming.runner as runner_module

        real_decode = runner_module.decode_windows

        def decode(codec, windows):  # type: ignore[no-untyped-def]
            if any(w.decoder.left == 2 for w in windows):  # the poisoned session's SNAC context
                raise RuntimeError("secret internals of SNAC")
            return real_decode(codec, windows)

        monkeypatch.setattr(runner_module, "decode_windows", decode)


def _is_poison(model: Any, prompt: Any) -> bool:
    text_row = prompt.ids[prompt.text_row, model.layout.text_stream].tolist()
    return "poison" in model.tokenizer.decode([t for t in text_row if t < model.layout.text_special_base])


@pytest.mark.parametrize("stage", ["encode", "prefill", "step", "snac"])
def test_a_failure_ends_only_the_response_it_touched(
    tiny_model: Any, vad: Any, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    _install_fault(stage, tiny_model, monkeypatch)
    runner = ModelRunner(tiny_model).start()
    try:
        cfg = SessionConfig(max_audio_lead_ms=1e6, max_new_tokens=40)
        good = LocalSession(runner, vad, None, cfg)
        bad = LocalSession(runner, vad, None, cfg.replace(left_context_frames=2))
        good.add_text("Tell me about the weather.", create_response=True)
        bad.add_text("poison", create_response=True)
        bad_events = collect(bad, done)
        good_events = collect(good, done)
        errors = [e for e in bad_events if isinstance(e, SessionError)]
        assert [e.code for e in errors] == ["server_error"] and errors[0].message == SERVER_ERROR_MESSAGE
        end = bad_events[-1]
        assert isinstance(end, ResponseDone) and end.status == "failed" and "secret" not in (end.reason or "")
        assert good_events[-1].status in ("completed", "incomplete")  # type: ignore[attr-defined]
        # The failed session takes its next turn (with the SNAC context the fault keys on restored).
        bad.update(cfg)
        bad.add_text("What is your name?", create_response=True)
        assert collect(bad, done)[-1].status in ("completed", "incomplete")  # type: ignore[attr-defined]
    finally:
        runner.close()


def test_a_batched_step_that_fails_once_is_retried_row_by_row(
    tiny_model: Any, vad: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient failure of a batched step costs nothing: each response retries alone and
    its answer is token for token the one it would have been."""

    def answer(runner: ModelRunner, text: str) -> str:
        s = LocalSession(runner, vad, None, SessionConfig(max_audio_lead_ms=1e6, max_new_tokens=40))
        s.add_text(text, create_response=True)
        return collect(s, done)[-1].transcript  # type: ignore[attr-defined]

    runner = ModelRunner(tiny_model).start()
    try:
        expected = [answer(runner, t) for t in ("What is your name?", "Tell me a joke.")]
        real_forward = tiny_model.llm.hidden_batched
        failures = []

        def flaky(embeds, groups):  # type: ignore[no-untyped-def]
            if len(groups) > 1 and len(failures) < 3:
                failures.append(len(groups))
                raise RuntimeError("transient")
            return real_forward(embeds, groups)

        monkeypatch.setattr(tiny_model.llm, "hidden_batched", flaky)
        sessions = [LocalSession(runner, vad, None, SessionConfig(max_audio_lead_ms=1e6, max_new_tokens=40))
                    for _ in range(2)]  # fmt: skip
        for s, t in zip(sessions, ("What is your name?", "Tell me a joke."), strict=True):
            s.add_text(t, create_response=True)
        got = [collect(s, done)[-1] for s in sessions]
        assert failures, "the two answers never shared a batched step"
        assert [e.status for e in got] != ["failed", "failed"]  # type: ignore[attr-defined]
        assert [e.transcript for e in got] == expected  # type: ignore[attr-defined]
    finally:
        runner.close()


def test_a_recognizer_failure_fails_only_the_transcript(tiny_model: Any, vad: Any) -> None:
    from streaming.detector import RecognizerWorker

    class Broken:
        def transcribe(self, audio: np.ndarray, prompt: str | None = None) -> str:
            raise RuntimeError("recognizer down")

    worker = RecognizerWorker(Broken())
    runner = ModelRunner(tiny_model).start()
    try:
        s = LocalSession(runner, vad, worker, SessionConfig(turn_detection=None, input_sample_rate=16000,
                                                             transcribe_input=True, max_new_tokens=10))  # fmt: skip
        s.append_audio(np.zeros(16000, "<i2").tobytes())
        s.commit()
        s.create_response()
        events = collect(s, lambda ev: done(ev) and any(isinstance(e, InputTranscript) for e in ev))
        assert next(e for e in events if isinstance(e, InputTranscript)).failed
        assert any(isinstance(e, ResponseDone) and e.status in ("completed", "incomplete") for e in events)
    finally:
        runner.close()
        worker.close()


# ---------------- the server's loop is never blocked ----------------


class SlowASR:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def transcribe(self, audio: np.ndarray, prompt: str | None = None) -> str:
        self.calls += 1
        time.sleep(self.seconds)
        return "slow"


@pytest.fixture()
def slow_asr_server(tiny_ckpt: Path) -> Iterator[tuple[Running, SlowASR]]:
    from model.omni import OmniModel
    from server.app import Engine
    from server.serve import start_in_thread
    from streaming.detector import RecognizerWorker

    settings = ServerSettings(port=0, checkpoint_dir=tiny_ckpt, max_sessions=4, log_level="warning", turn_model=False)
    asr = SlowASR(2.0)
    engine = Engine(OmniModel.load(tiny_ckpt), settings, demo=True, recognizer=RecognizerWorker(asr, max_jobs=2))
    srv, thread, port = start_in_thread(engine)
    r = Running(engine, thread, srv, port)
    yield r, asr
    stop_server(r)


def test_a_slow_recognizer_with_a_full_queue_holds_nobody_up(slow_asr_server: tuple[Running, SlowASR]) -> None:
    server, asr = slow_asr_server
    flooder = open_client(server)
    flooder.update(audio={"input": {"turn_detection": None, "transcription": {"model": "whisper-1"},
                                    "format": {"type": "audio/pcm", "rate": 16000}}})  # fmt: skip
    probe = open_client(server)
    chunk = {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(3200)).decode()}

    def flood() -> None:  # every commit asks the 2 s recognizer for a transcript
        for _ in range(8):
            flooder.send(chunk)
            flooder.send({"type": "input_audio_buffer.commit"})

    t = threading.Thread(target=flood)
    t.start()
    rtts = []
    for _ in range(20):
        t0 = time.monotonic()
        probe.send({"type": "input_audio_buffer.clear"})
        probe.recv_until(lambda e: e["type"] == "input_audio_buffer.cleared", timeout=5)
        rtts.append(time.monotonic() - t0)
        time.sleep(0.05)
    t.join()
    assert asr.calls >= 1  # the recognizer was busy meanwhile
    # Its list was full (2 jobs, 2 s each): later transcripts failed at once instead of waiting.
    got = flooder.recv_until(lambda e: e["type"] == "conversation.item.input_audio_transcription.failed", timeout=10)
    assert any(e["type"] == "input_audio_buffer.committed" for e in got)
    print(f"probe round trips while the recognizer was saturated: max {max(rtts) * 1000:.0f} ms, "
          f"median {sorted(rtts)[len(rtts) // 2] * 1000:.0f} ms")  # fmt: skip
    assert max(rtts) < 0.25  # the old code held every loop up to 2 s here
    flooder.ws.close()
    probe.ws.close()


def test_a_client_that_stops_reading_is_cut_off_by_bytes(tiny_ckpt: Path) -> None:
    """Few events, many bytes: the byte bound cuts the client off (1008), and memory is not kept."""
    import socket

    from .test_server import start_server
    from .test_server_robustness import _frame, _raw_ws

    r = start_server(ServerSettings(port=0, checkpoint_dir=tiny_ckpt, send_buffer_bytes=256 * 1024,
                                    send_timeout_s=3, interrupt_detector=False, log_level="warning"))  # fmt: skip
    try:
        slow = _raw_ws(r.port)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        update = {"type": "session.update", "session": {"type": "realtime", "instructions": "x" * 30000}}
        frame = _frame(json.dumps(update))
        deadline = time.monotonic() + 30
        sent = 0
        slow.settimeout(1.0)  # once the server stops reading (it cut us off), sends stall
        while time.monotonic() < deadline and len(r.engine.connections) == 1:
            try:
                slow.sendall(frame)
                sent += 1
            except TimeoutError:
                continue
            except OSError:
                break
            time.sleep(0.005)
        assert len(r.engine.connections) == 0, "the client that stopped reading was never cut off"
        print(f"cut off after {sent} echoes of ~30 kB (bound 256 KiB)")
        slow.close()
    finally:
        stop_server(r)


def test_stage_threads_parse_and_defaults() -> None:
    from streaming.config import StageThreads

    assert StageThreads.for_cores(2) == StageThreads(llm=2, encoder=2, encoder_busy=1, snac=1)
    assert StageThreads.for_cores(8) == StageThreads(llm=8, encoder=8, encoder_busy=4, snac=1)
    assert StageThreads.parse("snac=2, encoder_busy=2", cores=4) == StageThreads(4, 4, 2, 2)
    assert StageThreads.parse("", cores=1) == StageThreads(1, 1, 1, 1)
    for bad in ("llm=0", "gpu=2", "llm", "llm=two"):
        with pytest.raises(ValueError, match="stage threads"):
            StageThreads.parse(bad)
    with pytest.raises(ValueError, match="stage_threads"):
        ServerSettings(stage_threads="snac=0")


def _play_a_long_answer(runner: ModelRunner) -> ResponseStream:
    """Answer "a" (400 steps, no playback bound), read until its first audio: from then on it
    is being decoded beside whatever comes next."""
    from model.prompts import Task
    from streaming.events import AudioChunk
    from streaming.runner import ResponseRequest

    long = ResponseRequest(Task.A1A2, audio=np.zeros(16000, np.float32), max_new_tokens=400, stop_rules=False,
                           max_audio_lead_ms=1e9)  # fmt: skip
    first = runner.stream("a", long)
    while not isinstance(first.get(timeout=30), AudioChunk):  # queue.Empty if it never plays
        pass
    return first


def test_each_stage_runs_its_budget_and_an_encode_beside_a_playing_answer_takes_fewer(
    tiny_model: Any, vad: Any
) -> None:
    """The budget is set on each stage's own thread; the encoder takes every core it is given
    for a turn alone and `encoder_busy` while another answer is being decoded."""
    import torch

    from model.prompts import Task
    from streaming.config import StageThreads
    from streaming.runner import ResponseRequest

    main_threads = torch.get_num_threads()
    threads = StageThreads(llm=2, encoder=3, encoder_busy=1, snac=1)
    runner = ModelRunner(tiny_model, threads=threads).start()
    try:
        first = _play_a_long_answer(runner)
        audio = np.zeros(16000, np.float32)
        second = runner.stream("b", ResponseRequest(Task.A1A2, audio=audio, max_new_tokens=8, stop_rules=False))
        done_b = second.wait(60)
        first.cancel()
        done_a = first.wait(60)
        assert done_a is not None and done_b is not None
        assert done_a.timings["encode_threads"] == 3  # alone: the whole encoder budget
        assert done_b.timings["encode_threads"] == 1  # beside answer a, still stepping
        assert runner.stage_threads() == {"llm": 2, "encoder": 3, "encoder_busy": 1, "snac": 1}
        assert torch.get_num_threads() == main_threads  # the stages' settings stay on their threads
    finally:
        runner.close()


def test_a_prompt_beside_a_playing_answer_is_prefilled_in_parts(tiny_model: Any, question_audio: Any) -> None:
    """While answer a is being decoded, b's prefill runs in parts of at most prefill_chunk
    positions, a's steps between them; alone, a prompt is prefilled at once. Either way b's
    answer is the same."""
    from model.prompts import Task
    from streaming.runner import ResponseRequest

    question = ResponseRequest(Task.A1A2, audio=question_audio, max_new_tokens=12, stop_rules=False)
    runner = ModelRunner(tiny_model, prefill_chunk=16).start()
    try:
        alone = runner.stream("alone", question).wait(60)
        first = _play_a_long_answer(runner)
        beside = runner.stream("b", question).wait(60)
        first.cancel()
        assert first.wait(60) is not None
    finally:
        runner.close()
    assert alone is not None and beside is not None
    positions = beside.usage["input_tokens"]
    assert positions > 2 * 16
    assert alone.timings["prefill_parts"] == 1
    assert beside.timings["prefill_parts"] == -(-positions // 16)  # equal parts of <= 16
    assert beside.transcript == alone.transcript != "" and beside.usage == alone.usage
    with pytest.raises(ValueError, match="prefill_chunk"):
        ModelRunner(tiny_model, prefill_chunk=-1)


def test_a_held_speculation_beside_a_playing_answer_is_prefilled_in_parts(tiny_model: Any, question_audio: Any) -> None:
    """A speculation (held) submitted while answer a plays: prefilled in parts, nothing out
    until its release, then the answer of an unheld, unsplit run."""
    from model.prompts import Task
    from streaming.runner import ResponseRequest

    question = ResponseRequest(Task.A1A2, audio=question_audio, max_new_tokens=12, stop_rules=False)
    runner = ModelRunner(tiny_model, prefill_chunk=8).start()
    try:
        alone = runner.stream("alone", question).wait(60)
        first = _play_a_long_answer(runner)
        held = runner.stream("b", question, held=True)
        time.sleep(1.0)  # its encode and prefill parts run meanwhile
        assert held.drain() == []  # a speculation sends nothing before its release
        runner.release(held.key)
        done = held.wait(60)
        first.cancel()
        assert first.wait(60) is not None
    finally:
        runner.close()
    assert alone is not None and done is not None and done.status == alone.status == "incomplete"  # the budget
    assert done.timings["prefill_parts"] > 1 and "speculation_lead_ms" in done.timings
    assert done.transcript == alone.transcript and done.usage == alone.usage


def test_prefill_chunk_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from omnivox.cli import build_parser

    assert ServerSettings().prefill_chunk == 64
    monkeypatch.setenv("OMNIVOX_PREFILL_CHUNK", "0")
    assert ServerSettings().prefill_chunk == 0
    with pytest.raises(ValueError, match="prefill_chunk"):
        ServerSettings(prefill_chunk=-1)
    parser = build_parser()
    assert parser.parse_args(["serve", "--prefill-chunk", "32"]).prefill_chunk == 32
    assert parser.parse_args(["serve"]).prefill_chunk is None  # then the environment / default decides
    assert parser.parse_args(["bench", "pipeline", "--prefill-chunk", "0,64"]).prefill_chunk == (0, 64)


def test_bench_pipeline_runs_each_prefill_chunk_with_a_listener_bound(tiny_ckpt: Path) -> None:
    """With the server's 1000 ms audio lead, every level finishes (the warm-up answer has no
    listener, so it must not be lead-bound) and each prefill_chunk variant is a row."""
    from benchmarks.pipeline import bench_pipeline

    from .conftest import FIXTURES

    t0 = time.monotonic()
    result = bench_pipeline(tiny_ckpt, FIXTURES / "question.wav", dtype="float32", steps=16, levels=(2,),
                            stagger_ms=100, max_audio_lead_ms=1000, prefill_chunks=(0, 16))  # fmt: skip
    assert time.monotonic() - t0 < 120
    rows = result["levels"]
    assert [r["prefill_chunk"] for r in rows] == [0, 16]
    for row in rows:
        assert row["sessions"] == 2 and row["first_audio_ms"] is not None
        assert row["audio_s_per_answer"] > 0.5  # 16 steps: 9 frames of 85 ms after the 7-step delay
        assert 0 <= row["max_chunk_gap_ms"] < 5000
