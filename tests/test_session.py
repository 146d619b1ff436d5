"""Sessions end to end on the tiny checkpoint: turn taking, responses, barge-in, bad input."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from streaming.config import InterruptMode, SessionConfig, TurnDetection
from streaming.detector import match_phrase, normalize
from streaming.driver import LocalSession
from streaming.events import (
    AudioChunk,
    Event,
    InputCleared,
    InputCommitted,
    Interrupted,
    ResponseCreated,
    ResponseDone,
    SessionError,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
)
from streaming.runner import ModelRunner, ResponseRequest

from .conftest import fixture_audio


def pcm16(audio: np.ndarray) -> bytes:
    return np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes()  # exact for int16 input


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), np.float32)


def feed(session: LocalSession, audio: np.ndarray, chunk: int = 1600) -> None:
    for i in range(0, audio.size, chunk):
        session.append_audio(pcm16(audio[i : i + chunk]))


def collect(session: LocalSession, until: Callable[[list[Event]], bool], timeout: float = 20.0) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += session.poll()
        if until(events):
            return events
        time.sleep(0.005)
    raise AssertionError(f"timed out; got {[type(e).__name__ for e in events]}")


def done(events: list[Event]) -> bool:
    return any(isinstance(e, ResponseDone) for e in events)


def kinds(events: list[Event]) -> list[str]:
    out: list[str] = []
    for e in events:
        name = type(e).__name__
        if not out or out[-1] != name or name not in ("AudioChunk", "TranscriptDelta"):
            out.append(name)
    return out


def test_turn_then_response_events_in_order(runner: ModelRunner, vad, recognizer) -> None:
    s = LocalSession(runner, vad, recognizer, SessionConfig(input_sample_rate=16000))
    feed(s, np.concatenate([silence(0.5), fixture_audio("question"), silence(1.0)]))
    events = collect(s, done)
    order = kinds(events)
    assert order[:4] == ["SpeechStarted", "SpeechStopped", "InputCommitted", "ResponseCreated"]
    assert order[-1] == "ResponseDone" and "AudioChunk" in order and "TranscriptDelta" in order
    started, stopped, committed, created = events[:4]
    assert isinstance(started, SpeechStarted) and isinstance(stopped, SpeechStopped)
    assert isinstance(committed, InputCommitted) and isinstance(created, ResponseCreated)
    assert started.item_id == stopped.item_id == committed.item_id
    assert 350 <= started.audio_start_ms <= 700 and stopped.audio_end_ms > started.audio_start_ms
    assert created.task == "a1a2"
    rid = created.response_id
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert all(c.response_id == rid for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    end = events[-1]
    assert isinstance(end, ResponseDone) and end.status == "completed"
    assert end.transcript == "".join(e.delta for e in events if isinstance(e, TranscriptDelta))
    assert end.audio_ms == pytest.approx(sum(len(c.pcm) for c in chunks) / 2 / 24)
    assert end.timings["ttfa_ms"] is not None and end.timings["steps"] == end.usage["output_tokens"]


def test_streamed_response_equals_generate(runner: ModelRunner, vad, tiny_model) -> None:
    """The session's audio is the one-shot decode of the same tokens `generate` makes."""
    from model.prompts import Task

    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000, turn_detection=None))
    q = fixture_audio("question")
    feed(s, q)
    s.commit()
    s.create_response()
    events = collect(s, done)
    pcm = np.frombuffer(b"".join(e.pcm for e in events if isinstance(e, AudioChunk)), dtype="<i2")
    result = tiny_model.start(tiny_model.prompt(Task.A1A2, audio=q)).run()
    ref = np.round(np.clip(tiny_model.decode_frames(result.frames), -1, 1) * 32767)
    assert pcm.shape == ref.shape
    assert np.max(np.abs(pcm - ref)) <= max(2, 1e-3 * np.max(np.abs(ref)))


def test_speculation_gives_the_same_answer_sooner(runner: ModelRunner, vad) -> None:
    """Encode and prefill begun at the turn's first silent window change no token: transcript
    and audio are identical to the answer started at the turn's end. Fed in real time, the
    speculation's prefill was done before the 500 ms of silence ran out."""
    turn = np.concatenate([silence(0.3), fixture_audio("question"), silence(0.8)])
    answers = []
    for speculate in (None, 0):
        s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000, speculate_after_ms=speculate))
        for i in range(0, turn.size, 1600):  # 100 ms chunks at real-time pace
            s.append_audio(pcm16(turn[i : i + 1600]))
            time.sleep(0.1)
        events = collect(s, done)
        end = next(e for e in events if isinstance(e, ResponseDone))
        assert end.status == "completed"
        pcm = b"".join(e.pcm for e in events if isinstance(e, AudioChunk))
        answers.append((end.transcript, pcm, end.timings))
    (text0, pcm0, plain), (text1, pcm1, speculated) = answers
    assert text1 == text0 and pcm1 == pcm0 and pcm0
    assert "speculation_lead_ms" not in plain
    # prefilled before the turn ended; how much sooner the audio comes is `bench latency`'s to
    # measure (here both answers' first audio is read when the feeding loop ends: ~205 ms each)
    assert speculated["speculation_lead_ms"] > 0


def test_a_dropped_speculation_frees_its_slot(runner: ModelRunner, vad) -> None:
    """Speech that resumes after a pause: the speculative answer is cancelled and its slot
    (and KV cache) freed; one answer follows the whole turn."""
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000, speculate_after_ms=0))
    q = fixture_audio("question")
    feed(s, np.concatenate([silence(0.3), q, silence(0.2)]))
    time.sleep(0.5)  # the speculation is encoded and prefilled meanwhile
    s.poll()
    assert runner.active_count == 1
    feed(s, np.concatenate([q, silence(1.0)]))
    events = collect(s, done)
    assert sum(isinstance(e, ResponseCreated) for e in events) == 1
    assert next(e for e in events if isinstance(e, InputCommitted)).duration_ms > 2 * 1000
    deadline = time.monotonic() + 5
    while runner.active_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.active_count == 0


def test_input_at_24k_is_resampled(runner: ModelRunner, vad) -> None:
    import soxr

    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=24000))
    audio16 = np.concatenate([silence(0.5), fixture_audio("question"), silence(1.0)])
    audio24 = soxr.resample(audio16, 16000, 24000).astype(np.float32)
    feed(s, audio24, chunk=2400)
    events = collect(s, done)
    assert kinds(events)[:3] == ["SpeechStarted", "SpeechStopped", "InputCommitted"]


def test_push_to_talk_commit_clear_and_empty_commit(runner: ModelRunner, vad) -> None:
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000, turn_detection=None))
    s.commit()
    (err,) = s.poll()
    assert isinstance(err, SessionError) and err.code == "input_audio_buffer_commit_empty"
    feed(s, fixture_audio("question"))
    s.clear()
    assert isinstance(s.poll()[0], InputCleared)
    s.commit()
    assert isinstance(s.poll()[0], SessionError)
    feed(s, fixture_audio("question"))
    assert not any(isinstance(e, SpeechStarted) for e in s.poll())  # no VAD turns in push-to-talk
    s.commit()
    time.sleep(0.2)
    (committed,) = s.poll()  # as OpenAI: a commit does not start a response
    assert isinstance(committed, InputCommitted) and committed.duration_ms == 1341
    rid = s.create_response()
    events = collect(s, done)
    assert isinstance(events[0], ResponseCreated) and events[0].response_id == rid


def test_create_response_false_waits_for_response_create(runner: ModelRunner, vad) -> None:
    cfg = SessionConfig(input_sample_rate=16000, turn_detection=TurnDetection(create_response=False))
    s = LocalSession(runner, vad, None, cfg)
    feed(s, np.concatenate([silence(0.3), fixture_audio("question"), silence(1.0)]))
    time.sleep(0.2)
    assert not any(isinstance(e, ResponseCreated) for e in s.poll())
    rid = s.create_response(output_modalities=("text",))
    events = collect(s, done)
    assert isinstance(events[0], ResponseCreated) and events[0].response_id == rid and events[0].task == "a1t2"
    assert not any(isinstance(e, AudioChunk) for e in events)


def test_text_turns(runner: ModelRunner, vad) -> None:
    s = LocalSession(runner, vad, None, SessionConfig(output_modalities=("text",)))
    s.add_text("What is your name?", create_response=True)
    events = collect(s, done)
    assert isinstance(events[0], ResponseCreated) and events[0].task == "t1t2"
    s.create_response(output_modalities=("audio",))
    events = collect(s, done)
    assert events[0].task == "t1a2" and any(isinstance(e, AudioChunk) for e in events)


def test_second_response_while_one_runs_is_refused(runner: ModelRunner, vad) -> None:
    s = LocalSession(runner, vad, None, SessionConfig(max_audio_lead_ms=200))
    s.add_text("What is your name?", create_response=True)
    assert s.create_response() is None
    events = s.poll()
    assert any(isinstance(e, SessionError) and e.code == "conversation_already_has_active_response" for e in events)
    collect(s, done)


def test_turn_longer_than_30_s_is_committed_at_the_limit(runner: ModelRunner, vad) -> None:
    q = fixture_audio("question")
    speech = np.tile(np.concatenate([q, silence(0.1)]), 24)  # ~34 s, pauses shorter than the silence window
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000, max_new_tokens=12))
    feed(s, speech, chunk=16000)
    events = s.poll()
    errors = [e for e in events if isinstance(e, SessionError)]
    assert [e.code for e in errors] == ["input_too_long"]
    committed = [e for e in events if isinstance(e, InputCommitted)]
    assert committed[0].truncated and committed[0].duration_ms == 30000
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(starts) == 2  # the speech goes on as a new turn, nothing dropped
    collect(s, done)


def test_push_to_talk_longer_than_30_s(runner: ModelRunner, vad) -> None:
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=16000, turn_detection=None, max_new_tokens=3))
    feed(s, silence(31), chunk=32000)
    events = s.poll()
    assert any(isinstance(e, InputCommitted) and e.truncated and e.duration_ms == 30000 for e in events)
    s.commit()  # the remaining second is still there
    assert any(isinstance(e, InputCommitted) and e.duration_ms == 1000 for e in s.poll())
    s.create_response()
    collect(s, done)


def test_garbage_input_gets_errors_and_the_session_keeps_working(runner: ModelRunner, vad) -> None:
    s = LocalSession(runner, vad, None, SessionConfig(input_sample_rate=24000, max_new_tokens=10))
    s.append_audio(b"\x01\x02\x03")
    (err,) = s.poll()
    assert isinstance(err, SessionError) and err.code == "invalid_audio" and "even number" in err.message
    s.append_audio(b"")
    s.append_audio(np.zeros(5 * 1024 * 1024, dtype="<i2").tobytes())  # 10 MB of silence
    assert s.poll() == []
    s.append_audio(b"\x00" * (17 * 1024 * 1024))
    assert s.poll()[0].code == "invalid_audio"
    s.add_text("still there?", create_response=True)
    assert isinstance(collect(s, done)[-1], ResponseDone)


# ---------------- the model runner ----------------


def test_cancel_lands_within_one_step(runner: ModelRunner) -> None:
    from model.prompts import Task

    h = runner.stream("r1", ResponseRequest(Task.T1T2, text="hello", max_new_tokens=2000))
    deadline = time.monotonic() + 10
    while runner.steps_total < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    before = runner.steps_total
    h.cancel("client_cancelled")
    done = h.wait(5)
    assert done is not None and done.status == "cancelled" and done.reason == "client_cancelled"
    assert runner.steps_total - before <= 1


def test_decoding_goes_on_while_a_new_turn_encodes(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whisper/CLIP run on the encoder thread: a slow encode of one turn never stops the
    steps of an answer already being decoded (on the runner thread it would stall them)."""
    import threading

    from model.prompts import Task

    real_prompt = tiny_model.prompt
    encoding = threading.Event()
    release = threading.Event()

    def slow_prompt(task, **kw):  # type: ignore[no-untyped-def]
        if kw.get("text") == "slow":
            encoding.set()
            release.wait(10)
        return real_prompt(task, **kw)

    monkeypatch.setattr(tiny_model, "prompt", slow_prompt)
    r = ModelRunner(tiny_model).start()
    try:
        a = r.stream("a", ResponseRequest(Task.T1T2, text="hello", max_new_tokens=2000, stop_rules=False))
        b = r.stream("b", ResponseRequest(Task.T1T2, text="slow", max_new_tokens=5))
        assert encoding.wait(10)
        # While b's encode is held, a keeps stepping (decided by steps made, not by wall time).
        before = r.steps_total
        deadline = time.monotonic() + 20
        while r.steps_total - before < 30 and time.monotonic() < deadline:
            a.drain()
            time.sleep(0.005)
        assert r.steps_total - before >= 30
        assert r.active_count == 2 and b.done is None and b.events.empty()
        release.set()
        done_b = b.wait(10)
        assert done_b is not None and done_b.status in ("completed", "incomplete")
        a.cancel()
        assert a.wait(5) is not None
    finally:
        release.set()
        r.close()


def test_two_sessions_answer_at_once(runner: ModelRunner, vad) -> None:
    cfg = SessionConfig(max_audio_lead_ms=100000)
    a, b = LocalSession(runner, vad, None, cfg), LocalSession(runner, vad, None, cfg)
    a.add_text("What is your name?", create_response=True)
    b.add_text("Tell me a joke about the weather.", create_response=True)
    got: dict[str, list[tuple[float, Event]]] = {"a": [], "b": []}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(done([e for _, e in v]) for v in got.values()):
        for name, sess in (("a", a), ("b", b)):
            now = time.monotonic()
            got[name] += [(now, e) for e in sess.poll()]
        time.sleep(0.002)

    def first(name: str, kind: type) -> float:
        return next(t for t, e in got[name] if isinstance(e, kind))

    # Each answer had made progress before the other one ended: they ran at the same time.
    assert first("b", AudioChunk) < first("a", ResponseDone)
    assert first("a", AudioChunk) < first("b", ResponseDone)


def test_pacing_keeps_generation_near_playback(runner: ModelRunner) -> None:
    from model.prompts import Task

    req = ResponseRequest(Task.T1A2, text="hi", max_audio_lead_ms=400, max_new_tokens=200, max_chunk_frames=1)
    h = runner.stream("r", req)
    time.sleep(1.0)  # nobody plays anything: generation stops at the lead
    frames = sum(len(e.pcm) for e in h.drain() if isinstance(e, AudioChunk)) // 2 // 2048
    # 400 ms of audio ahead (4.7 frames, plus at most one): frames are made up to 400 ms + chunk
    # (1) + lookahead (3) = 741 ms, i.e. 9; the last 3 wait for their lookahead.
    assert 4 <= frames <= 6
    assert h.done is None
    h.cancel()
    assert h.wait(5) is not None


# ---------------- barge-in ----------------


def _speaking_session(runner, vad, recognizer, mode: InterruptMode) -> tuple[LocalSession, list[Event]]:
    cfg = SessionConfig(input_sample_rate=16000, interrupt_mode=mode, max_audio_lead_ms=600)
    s = LocalSession(runner, vad, recognizer, cfg)
    feed(s, np.concatenate([silence(0.3), fixture_audio("question"), silence(0.7)]))
    events = collect(s, lambda ev: any(isinstance(e, AudioChunk) for e in ev))
    return s, events


def _say(s: LocalSession, name: str) -> None:
    feed(s, np.concatenate([fixture_audio(name), silence(0.7)]), chunk=512)


def test_stop_omni_interrupts_in_command_mode(runner, vad, recognizer) -> None:
    s, before = _speaking_session(runner, vad, recognizer, InterruptMode.COMMAND)
    rid = next(e.response_id for e in before if isinstance(e, ResponseCreated))
    _say(s, "stop_omni")
    events = collect(s, lambda ev: any(isinstance(e, Interrupted) for e in ev), timeout=10)
    time.sleep(0.3)
    events += s.poll()
    inter = next(e for e in events if isinstance(e, Interrupted))
    assert inter.phrase in ("stop omni", "stop") and inter.response_id == rid  # "stop" may be heard first
    i = events.index(inter)
    assert isinstance(events[i - 1], SpeechStarted)
    end = [e for e in events if isinstance(e, ResponseDone)]
    assert len(end) == 1 and end[0].status == "cancelled" and end[0].reason == "turn_detected"
    assert not any(isinstance(e, AudioChunk) for e in events[i:])  # nothing of it after the cancel
    assert not any(isinstance(e, (InputCommitted, ResponseCreated)) for e in events)  # no new turn
    stopped = [e for e in events if isinstance(e, SpeechStopped)]  # the command's speech ends as it started
    assert [e.item_id for e in stopped] == [events[i - 1].item_id]
    assert stopped[0].audio_end_ms >= events[i - 1].audio_start_ms
    assert s.response is None and not s.assistant_speaking


def test_backchannel_does_not_interrupt_in_command_mode(runner, vad, recognizer) -> None:
    s, _ = _speaking_session(runner, vad, recognizer, InterruptMode.COMMAND)
    _say(s, "yeah")
    assert next(s.session._segments) == 2  # the "yeah" was heard as one segment while the assistant spoke
    events = collect(s, done, timeout=20)
    assert not any(isinstance(e, (Interrupted, SpeechStarted, InputCommitted)) for e in events)
    assert next(e for e in events if isinstance(e, ResponseDone)).status == "completed"


def test_a_question_right_after_response_done_is_answered(runner, vad, recognizer) -> None:
    """Command mode, as a client that asks its next question as soon as response.done came,
    while the answer's audio still plays by the server's reckoning: the question is the next
    turn once that audio is over (it used to be checked for a command and dropped)."""
    s, events = _speaking_session(runner, vad, recognizer, InterruptMode.COMMAND)
    events += collect(s, done, timeout=20)
    first = next(e for e in events if isinstance(e, ResponseCreated)).response_id
    assert s.assistant_speaking  # the answer's audio has not finished playing
    audio_over = s.session._playback_until
    _say(s, "weather")
    assert next(s.session._segments) == 2  # heard as speech during the answer
    events = collect(s, lambda ev: any(isinstance(e, ResponseCreated) for e in ev), timeout=30)
    assert time.monotonic() >= audio_over  # answered once the answer's audio was over
    assert not any(isinstance(e, Interrupted) for e in events)
    order = [k for k in kinds(events) if k not in ("AudioChunk", "TranscriptDelta")]
    assert order == ["SpeechStarted", "SpeechStopped", "InputCommitted", "ResponseCreated"]
    committed = next(e for e in events if isinstance(e, InputCommitted))
    speech_ms = 1728  # silero's speech segment of the fixture, plus the 300 ms prefix padding
    assert abs(committed.duration_ms - (speech_ms + 300)) <= 100
    assert next(e for e in events if isinstance(e, ResponseCreated)).response_id != first


def test_backchannel_interrupts_in_vad_mode(runner, vad, recognizer) -> None:
    s, _ = _speaking_session(runner, vad, recognizer, InterruptMode.VAD)
    _say(s, "yeah")
    events = collect(s, lambda ev: any(isinstance(e, ResponseCreated) for e in ev), timeout=10)
    inter = next(e for e in events if isinstance(e, Interrupted))
    assert inter.phrase == ""
    assert next(e for e in events if isinstance(e, ResponseDone)).reason == "turn_detected"
    # As OpenAI's server_vad: the interrupting speech becomes the next user turn, answered once
    # the cancelled answer has ended. (Its end comes from the runner within a step; the audio
    # here is fed faster than real time, so it may come after the turn's speech_stopped.)
    order = [k for k in kinds(events) if k not in ("AudioChunk", "TranscriptDelta")]
    assert order[:2] == ["SpeechStarted", "Interrupted"]
    assert order.index("ResponseDone") < order.index("ResponseCreated")
    started = next(e for e in events if isinstance(e, SpeechStarted))
    stopped = next(e for e in events if isinstance(e, SpeechStopped))
    assert started.item_id == stopped.item_id  # one item: the interrupting turn
    after = events[events.index(inter) :]  # nothing of the old answer after the interruption
    assert not any(isinstance(e, AudioChunk) and e.response_id == inter.response_id for e in after)


def test_nothing_interrupts_in_none_mode(runner, vad, recognizer) -> None:
    s, _ = _speaking_session(runner, vad, recognizer, InterruptMode.NONE)
    _say(s, "stop_omni")
    events = collect(s, done, timeout=20)
    assert not any(isinstance(e, Interrupted) for e in events)


def test_phrase_matching() -> None:
    phrases = ("stop omni", "omni stop", "stop")
    assert normalize(" Stop, Omni!") == "stop omni"
    assert match_phrase("Stop Omni.", phrases) == "stop omni"
    assert match_phrase("stop omne", phrases) == "stop omni"  # an ASR slip
    assert match_phrase("Omni, stop.", phrases) == "omni stop"
    assert match_phrase("Stop by me.", phrases) == "stop"
    assert match_phrase("Yeah.", phrases) is None
    assert match_phrase("Uh-huh.", phrases) is None
    assert match_phrase("what is the weather like, please don't stop", phrases) is None
    assert match_phrase("", phrases) is None


@pytest.mark.parametrize(("name", "expected"), [("stop_omni", "stop omni"), ("stop", "stop"), ("yeah", None),
                                                ("question", None)])  # fmt: skip
def test_real_asr_detects_commands(recognizer, name: str, expected: str | None) -> None:
    from streaming.detector import bias_prompt

    phrases = ("stop omni", "omni stop", "stop")
    text = recognizer.recognizer.transcribe(fixture_audio(name), bias_prompt(phrases))
    assert match_phrase(text, phrases) == expected, text


def test_real_asr_takes_a_command_check_and_a_transcript_at_once(recognizer) -> None:
    """faster-whisper loaded twice: a command check (on its two-thread copy) while the other
    copy makes a transcript, each the text it gives alone."""
    from streaming.detector import bias_prompt

    assert recognizer.lanes == 2
    jobs = (("question", None, False), ("stop_omni", bias_prompt(("stop omni",)), True))
    asr = recognizer.recognizer
    assert (asr.threads, asr.command_threads) == (1, 2)
    alone = [asr.transcribe(fixture_audio("question")), asr.transcribe_command(fixture_audio("stop_omni"), jobs[1][1])]
    got: dict[str, str | None] = {}
    heard = {name: threading.Event() for name, _, _ in jobs}
    for name, p, urgent in jobs:  # the transcript first: it is being made when the check comes

        def done(text: str | None, name: str = name) -> None:
            got[name] = text
            heard[name].set()

        recognizer.submit(fixture_audio(name), p, done, urgent=urgent)
    assert all(h.wait(30) for h in heard.values())
    assert [got["question"], got["stop_omni"]] == alone


def test_model_asr_is_the_a1t1_task(runner: ModelRunner, tiny_model) -> None:
    from model.prompts import Task
    from streaming.detector import ModelASR

    q = fixture_audio("question")
    text = ModelASR(runner).transcribe(q)
    result = tiny_model.start(tiny_model.prompt(Task.A1T1, audio=q), max_new_tokens=48).run()
    assert text == tiny_model.text_of(result.text_tokens) and text


def test_input_transcription(runner: ModelRunner, vad, recognizer) -> None:
    from streaming.events import InputTranscript

    cfg = SessionConfig(input_sample_rate=16000, transcribe_input=True, max_new_tokens=10)
    s = LocalSession(runner, vad, recognizer, cfg)
    feed(s, np.concatenate([silence(0.3), fixture_audio("weather"), silence(0.7)]))
    events = collect(s, lambda ev: any(isinstance(e, InputTranscript) for e in ev) and done(ev))
    tr = next(e for e in events if isinstance(e, InputTranscript))
    committed = next(e for e in events if isinstance(e, InputCommitted))
    assert tr.item_id == committed.item_id
    assert normalize(tr.transcript) == "what is the weather like today"


def test_finished_responses_free_their_kv_cache(runner: ModelRunner, vad) -> None:
    """Memory stays bounded: a finished or cancelled answer keeps no cache alive."""
    import gc
    import weakref

    s = LocalSession(runner, vad, None, SessionConfig(max_audio_lead_ms=100000))
    refs = []
    original = runner.model.start

    def tracking_start(*args, **kwargs):
        gen = original(*args, **kwargs)
        refs.append(weakref.ref(gen.cache))
        return gen

    runner.model.start = tracking_start  # type: ignore[method-assign]
    try:
        for i in range(3):
            s.add_text(f"question {i}", create_response=True)
            collect(s, done)
        s.add_text("one more", create_response=True)
        s.cancel_response()
        time.sleep(0.3)
    finally:
        runner.model.start = original  # type: ignore[method-assign]
    gc.collect()
    assert len(refs) >= 3 and all(r() is None for r in refs)  # a cancel may land before the start
