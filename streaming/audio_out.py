"""Streamed SNAC decoding that equals a one-shot decode, edges and tail included.

SNAC's decoder is not causal: a frame decodes exactly only with enough frames on both
sides. We decode a sliding window (left context + chunk + lookahead) and keep the middle;
at the end of the response the last window simply ends where the sequence ends, as in a
one-shot decode. Lookahead costs generation time (a few steps), not audio time.

Every window is `span` = left + max chunk + lookahead frames long (more left context when
the chunk is shorter), except while an answer has fewer frames than that: SNAC then sees
at most `span` distinct input shapes. oneDNN compiles and caches kernels per input shape
(tens of MB each for the full-size SNAC, about a second to build), so free-running shapes
grew the server's memory for as long as it ran and stalled the audio at each new one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.codec import SAMPLES_PER_FRAME, SnacCodec, replace_non_codes


class StreamingSnacDecoder:
    def __init__(
        self,
        codec: SnacCodec,
        num_codes: int = 4096,
        chunk_frames: int = 1,
        left_context: int = 3,
        lookahead: int = 3,
        max_chunk_frames: int | None = None,
        first_lookahead: int | None = None,
    ) -> None:
        """The first chunk has `chunk_frames` frames (fast first audio); later chunks double up
        to `max_chunk_frames` (fewer, cheaper SNAC windows per second of audio).

        `first_lookahead` (opt-in fast start): the first chunk waits for only this many
        frames of lookahead instead of `lookahead`, so it comes that many decode steps
        sooner; its end is then approximate, every later chunk is exact again (its window
        has the full context on both sides)."""
        self.codec = codec
        self.num_codes = num_codes
        self.chunk = chunk_frames
        self.max_chunk = max(chunk_frames, max_chunk_frames or chunk_frames)
        self.left = left_context
        self.lookahead = lookahead
        self.first_lookahead = lookahead if first_lookahead is None else min(first_lookahead, lookahead)
        self.span = left_context + self.max_chunk + lookahead  # every window's size, once there are enough frames
        self._frames: list[torch.Tensor] = []  # the frames still needed as context, sanitized
        self._base = 0  # absolute index of _frames[0]
        self.emitted = 0  # frames already handed out as audio
        self.total = 0  # frames pushed

    def add(self, frame: Sequence[int]) -> None:
        """Add one raw frame (7 ids) without decoding anything yet."""
        row = torch.tensor([list(frame)], dtype=torch.long)
        previous = self._frames[-1] if self._frames else None
        self._frames.append(replace_non_codes(row, self.num_codes, previous)[0])
        self.total += 1

    def ready_window(self, final: bool = False) -> Window | None:
        """The next window that decodes exactly now (or, with `final`, at the end of the answer)."""
        if self.emitted >= self.total:
            return None
        if final:
            stop = min(self.emitted + self.max_chunk, self.total)
            end = min(self.total, stop + self.lookahead)  # the sequence's end, or full lookahead
        else:
            lookahead = self.first_lookahead if self.emitted == 0 else self.lookahead
            if self.total - self.emitted < self.chunk + lookahead:
                return None
            stop = self.emitted + self.chunk
            end = stop + lookahead
        # At least `left` frames of left context; more when the chunk is short: one window size.
        return Window(self, self.emitted, stop, max(0, end - self.span), end)

    def push(self, frame: Sequence[int]) -> list[np.ndarray]:
        """Add one raw frame (7 ids); returns the audio chunks that became exact."""
        self.add(frame)
        out = []
        while (w := self.ready_window()) is not None:
            out.append(w.take(self.codec.decode(w.frames())))
        return out

    def flush(self) -> list[np.ndarray]:
        """The rest, at the end of the response: the window ends with the sequence."""
        out = []
        while (w := self.ready_window(final=True)) is not None:
            out.append(w.take(self.codec.decode(w.frames())))
        return out

    def _advance(self, stop: int) -> None:
        self.emitted = stop
        self.chunk = min(self.chunk * 2, self.max_chunk)
        keep_from = max(0, self.emitted + 1 - self.span)  # older frames are never context again
        if keep_from > self._base:
            del self._frames[: keep_from - self._base]
            self._base = keep_from


@dataclass
class Window:
    """Frames [window_start, window_end) of one decoder; its audio for [start, stop) is exact."""

    decoder: StreamingSnacDecoder
    start: int
    stop: int
    window_start: int
    window_end: int

    @property
    def size(self) -> int:
        return self.window_end - self.window_start

    def frames(self) -> torch.Tensor:
        d = self.decoder
        return torch.stack(d._frames[self.window_start - d._base : self.window_end - d._base])

    def take(self, audio: np.ndarray) -> np.ndarray:
        """The exact middle of the window's decoded audio; moves the decoder on."""
        offset = (self.start - self.window_start) * SAMPLES_PER_FRAME
        chunk = audio[offset : offset + (self.stop - self.start) * SAMPLES_PER_FRAME]
        self.decoder._advance(self.stop)
        return chunk


def decode_windows(codec: SnacCodec, windows: Sequence[Window]) -> list[np.ndarray]:
    """Decode the ready windows of several answers, one SNAC call each: batching them saved
    nothing per window on CPU (full-size bf16 SNAC, 10 frames: 92 ms alone, 98 in twos, 96 in
    fours) and every batch size is another input shape for oneDNN's kernel cache."""
    decoded = [codec.decode_batch(w.frames()[None])[0] for w in windows]
    # Only once every call succeeded do the decoders move on: a failed call can be retried.
    return [w.take(audio) for w, audio in zip(windows, decoded, strict=True)]
