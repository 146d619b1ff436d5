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
    """The last `keep_samples` of 16 kHz input, addressable by absolute sample index."""

    def __init__(self, keep_samples: int) -> None:
        self.keep = keep_samples
        self._buf = np.zeros(0, np.float32)
        self.start = 0  # absolute index of _buf[0]

    @property
    def end(self) -> int:
        return self.start + self._buf.size

    def append(self, audio: np.ndarray) -> None:
        self._buf = np.concatenate([self._buf, audio])
        extra = self._buf.size - self.keep
        if extra > 0:
            self._buf = self._buf[extra:]
            self.start += extra

    def slice(self, begin: int, end: int) -> np.ndarray:
        begin, end = max(begin, self.start), min(end, self.end)
        if end <= begin:
            return np.zeros(0, np.float32)
        return self._buf[begin - self.start : end - self.start].copy()
