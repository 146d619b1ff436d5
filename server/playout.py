"""The output audio of a WebRTC call, played out by the server in real time (sans-I/O).

Over WebRTC the browser plays whatever arrives, so the server holds the answer's audio and
hands the media track one 20 ms frame per tick (silence when idle). Because it hands out the
frames, it knows what has been played: that is reported to the session as playback (pacing,
the barge-in window, truncation), and an interruption drops what is queued at once.

`next_frame` returns the frame and what happened: `Started` (first frame of a response),
`Played` (every `report_every_ms`, and when a response's audio runs out), `Stopped` (the
response ended and all its audio was played). The caller owns the clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

RATE = 24000  # SNAC's rate; the Opus encoder resamples to 48 kHz
FRAME_MS = 20
FRAME_SAMPLES = RATE * FRAME_MS // 1000
FRAME_BYTES = FRAME_SAMPLES * 2  # mono PCM16
SILENCE = bytes(FRAME_BYTES)


@dataclass(frozen=True)
class Started:
    response_id: str


@dataclass(frozen=True)
class Played:
    response_id: str
    played_ms: float


@dataclass(frozen=True)
class Stopped:
    response_id: str


PlayoutEvent = Started | Played | Stopped


class PlayoutBuffer:
    """Audio of at most one response at a time; a new response's audio replaces an old one's."""

    def __init__(self, max_bytes: int, report_every_ms: float = 100.0) -> None:
        self.max_bytes = max_bytes
        self.report_every_ms = report_every_ms
        self.response_id: str | None = None
        self.played_ms = 0.0  # of the current response
        self.dropped_bytes = 0  # audio refused because the buffer was full
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._offset = 0  # bytes of _chunks[0] already played
        self._ended = False  # no more audio will come for the current response
        self._started = False
        self._reported_ms = 0.0

    @property
    def queued_ms(self) -> float:
        return (self._queued - self._offset) / 2 / RATE * 1000

    @property
    def active(self) -> bool:
        """A response's audio is queued or playing (its `Stopped` has not been returned yet)."""
        return self.response_id is not None

    def push(self, response_id: str, pcm: bytes) -> None:
        if response_id != self.response_id:
            self._reset(response_id)
        if self._queued - self._offset + len(pcm) > self.max_bytes:
            self.dropped_bytes += len(pcm)  # never reached while the runner paces on our reports
            return
        if pcm:
            self._chunks.append(pcm)
            self._queued += len(pcm)

    def end(self, response_id: str) -> None:
        """The response is done: `Stopped` follows when its last frame has been played."""
        if response_id == self.response_id:
            self._ended = True

    def clear(self) -> Played | None:
        """Drop everything queued; returns where the cleared response stood (None: nothing played)."""
        rid = self.response_id
        if rid is None:
            return None
        played = Played(rid, self.played_ms)
        self._reset(None)
        return played

    def next_frame(self) -> tuple[bytes, list[PlayoutEvent]]:
        events: list[PlayoutEvent] = []
        rid = self.response_id
        if rid is None:
            return SILENCE, events
        frame = self._take(FRAME_BYTES)
        if frame:
            if not self._started:
                self._started = True
                events.append(Started(rid))
            self.played_ms += len(frame) / 2 / RATE * 1000
            if self.played_ms - self._reported_ms >= self.report_every_ms:
                self._reported_ms = self.played_ms
                events.append(Played(rid, self.played_ms))
        if self._queued == self._offset and self._ended:
            if self._reported_ms != self.played_ms:
                events.append(Played(rid, self.played_ms))
            if self._started:
                events.append(Stopped(rid))
            self._reset(None)
        return frame + SILENCE[len(frame) :], events

    def _take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and self._chunks:
            head = self._chunks[0]
            piece = head[self._offset : self._offset + n - len(out)]
            out += piece
            self._offset += len(piece)
            if self._offset == len(head):
                self._chunks.popleft()
                self._queued -= len(head)
                self._offset = 0
        return bytes(out)

    def _reset(self, response_id: str | None) -> None:
        self.response_id = response_id
        self.played_ms = 0.0
        self._chunks.clear()
        self._queued = 0
        self._offset = 0
        self._ended = False
        self._started = False
        self._reported_ms = 0.0
