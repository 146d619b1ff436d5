"""Input audio: PCM16 bytes of any chunk size -> 16 kHz float, with a sample timeline."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import soxr

from .g711 import FORMATS

MODEL_RATE = 16000
MAX_CHUNK_BYTES = 16 * 1024 * 1024


class InvalidAudio(ValueError):
    """Input bytes that are not PCM16 audio; the message says why."""


def decode_pcm16(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise InvalidAudio(f"PCM16 audio needs an even number of bytes, got {len(data)}")
    if len(data) > MAX_CHUNK_BYTES:
        raise InvalidAudio(f"audio chunk of {len(data)} bytes is larger than {MAX_CHUNK_BYTES}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def input_decoder(fmt: str) -> Callable[[bytes], np.ndarray]:
    """Wire bytes of an input format ("audio/pcm", "audio/pcmu", "audio/pcma") -> float audio."""
    if fmt == "audio/pcm":
        return decode_pcm16
    decode = FORMATS[fmt][0]

    def decode_g711(data: bytes) -> np.ndarray:
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidAudio(f"audio chunk of {len(data)} bytes is larger than {MAX_CHUNK_BYTES}")
        return decode(data)

    return decode_g711


class InputResampler:
    """Streaming resampler to 16 kHz (soxr): chunks of any size in, continuous audio out."""

    def __init__(self, in_rate: int) -> None:
        self.in_rate = in_rate
        self._stream = None if in_rate == MODEL_RATE else soxr.ResampleStream(in_rate, MODEL_RATE, 1, dtype="float32")

    def process(self, audio: np.ndarray) -> np.ndarray:
        if self._stream is None or audio.size == 0:
            return audio
        return np.asarray(self._stream.resample_chunk(audio), dtype=np.float32)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, np.float32)
        return np.asarray(self._stream.resample_chunk(np.zeros(0, np.float32), last=True), dtype=np.float32)


class AudioHistory:
    """At least the last `keep_samples` of 16 kHz input (at most 1.25x), addressable by absolute
    sample index.

    One buffer, allocated once, written in place: appending a 20 ms chunk copies the chunk,
    not the 40 s kept (re-allocating megabytes per chunk cost time and left the allocator's
    heap fragmented under load). When the buffer is full, the kept tail moves to its front."""

    def __init__(self, keep_samples: int) -> None:
        self.keep = keep_samples
        self._buf = np.zeros(keep_samples + max(keep_samples // 4, 1), np.float32)
        self._fill = 0  # valid samples in _buf
        self.start = 0  # absolute index of _buf[0]

    @property
    def end(self) -> int:
        return self.start + self._fill

    def append(self, audio: np.ndarray) -> None:
        n = audio.size
        if n >= self.keep:  # all that is kept comes from this chunk
            self.start += self._fill + n - self.keep
            self._buf[: self.keep] = audio[n - self.keep :]
            self._fill = self.keep
            return
        if self._fill + n > self._buf.size:
            drop = self._fill + n - self.keep
            self._buf[: self._fill - drop] = self._buf[drop : self._fill]
            self._fill -= drop
            self.start += drop
        self._buf[self._fill : self._fill + n] = audio
        self._fill += n

    def slice(self, begin: int, end: int) -> np.ndarray:
        begin, end = max(begin, self.start), min(end, self.end)
        if end <= begin:
            return np.zeros(0, np.float32)
        return self._buf[begin - self.start : end - self.start].copy()
