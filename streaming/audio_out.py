"""Streamed SNAC decoding that equals a one-shot decode, edges and tail included.

SNAC's decoder is not causal: a frame decodes exactly only with enough frames on both
sides. We decode a sliding window (left context + chunk + lookahead) and keep the middle;
at the end of the response the last window simply ends where the sequence ends, as in a
one-shot decode. Lookahead costs generation time (a few steps), not audio time.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    ) -> None:
        """The first chunk has `chunk_frames` frames (fast first audio); later chunks double up
        to `max_chunk_frames` (fewer, cheaper SNAC windows per second of audio)."""
        self.codec = codec
        self.num_codes = num_codes
        self.chunk = chunk_frames
        self.max_chunk = max(chunk_frames, max_chunk_frames or chunk_frames)
        self.left = left_context
        self.lookahead = lookahead
        self._frames: list[torch.Tensor] = []  # the frames still needed as context, sanitized
        self._base = 0  # absolute index of _frames[0]
        self.emitted = 0  # frames already handed out as audio
        self.total = 0  # frames pushed

    def push(self, frame: Sequence[int]) -> list[np.ndarray]:
        """Add one raw frame (7 ids); returns the audio chunks that became exact."""
        row = torch.tensor([list(frame)], dtype=torch.long)
        previous = self._frames[-1] if self._frames else None
        self._frames.append(replace_non_codes(row, self.num_codes, previous)[0])
        self.total += 1
        out = []
        while self.total - self.emitted >= self.chunk + self.lookahead:
            stop = self.emitted + self.chunk
            out.append(self._decode(self.emitted, stop, stop + self.lookahead))
            self.chunk = min(self.chunk * 2, self.max_chunk)
        return out

    def flush(self) -> list[np.ndarray]:
        """The rest, at the end of the response: the window ends with the sequence."""
        out = []
        while self.emitted < self.total:
            stop = min(self.emitted + self.max_chunk, self.total)
            out.append(self._decode(self.emitted, stop, self.total))
        return out

    def _decode(self, start: int, stop: int, window_end: int) -> np.ndarray:
        window_start = max(0, start - self.left)
        frames = torch.stack(self._frames[window_start - self._base : window_end - self._base])
        audio = self.codec.decode(frames)
        offset = (start - window_start) * SAMPLES_PER_FRAME
        chunk = audio[offset : offset + (stop - start) * SAMPLES_PER_FRAME]
        self.emitted = stop
        keep_from = max(0, self.emitted - self.left)  # older frames are never context again
        if keep_from > self._base:
            del self._frames[: keep_from - self._base]
            self._base = keep_from
        return chunk
