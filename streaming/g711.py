"""G.711 mu-law (``audio/pcmu``) and A-law (``audio/pcma``) codecs: 8 kHz mono, one byte per sample.

Vectorised numpy implementations of the ITU-T G.711 reference conversions, bit-exact with the
classic Sun ``g711.c`` routines (as used by CPython's ``audioop`` with width 2):

- encoding takes the top 14 (mu-law) or 13 (A-law) bits of each int16 sample, i.e. it truncates
  (arithmetic shift right) rather than rounds;
- decoding expands each code byte to the int16 value at the centre of its quantisation step.

Float audio is int16 / 32768, in [-1, 1); encoding floats scales by 32768, rounds to the nearest
integer, and clips to the int16 range (NaN becomes 0), so ``*_encode(*_decode(b)) == b`` for every byte.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import soxr

G711_RATE = 8000

_ULAW_BIAS = 0x84  # 132, in the 16-bit domain
_ULAW_CLIP = 8159  # largest magnitude in the 14-bit domain
# Upper bounds (inclusive) of each segment, in the biased 14-bit mu-law and 13-bit A-law domains.
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _as_int32(pcm: np.ndarray) -> np.ndarray:
    arr = np.asarray(pcm)
    if arr.dtype != np.int16:
        raise TypeError(f"expected an int16 array, got {arr.dtype}")
    return arr.reshape(-1).astype(np.int32)


def _codes(data: bytes | bytearray | memoryview) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


# --- mu-law -----------------------------------------------------------------------------------


def _ulaw_expand(codes: np.ndarray) -> np.ndarray:
    u = (~codes.astype(np.int32)) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


_ULAW_TABLE = _ulaw_expand(np.arange(256, dtype=np.uint8))
_ULAW_TABLE.flags.writeable = False


def ulaw_encode_int16(pcm: np.ndarray) -> bytes:
    """Encode int16 samples to mu-law code bytes."""
    val = _as_int32(pcm) >> 2  # 14-bit
    negative = val < 0
    # The reference maps a biased magnitude past the last segment (8159 + 33 = 8192) to the top code;
    # capping it at that segment's end (0x1FFF) gives the same code (segment 7, step 15).
    mag = np.minimum(np.minimum(np.abs(val), _ULAW_CLIP) + (_ULAW_BIAS >> 2), 0x1FFF)
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left")  # first segment whose end is >= mag
    code = (seg << 4) | ((mag >> (seg + 1)) & 0x0F)
    code ^= np.where(negative, 0x7F, 0xFF)
    return code.astype(np.uint8).tobytes()


def ulaw_decode_int16(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode mu-law code bytes to int16 samples."""
    return _ULAW_TABLE[_codes(data)]


# --- A-law ------------------------------------------------------------------------------------


def _alaw_expand(codes: np.ndarray) -> np.ndarray:
    a = codes.astype(np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ALAW_TABLE = _alaw_expand(np.arange(256, dtype=np.uint8))
_ALAW_TABLE.flags.writeable = False


def alaw_encode_int16(pcm: np.ndarray) -> bytes:
    """Encode int16 samples to A-law code bytes."""
    val = _as_int32(pcm) >> 3  # 13-bit
    negative = val < 0
    mag = np.where(negative, -val - 1, val)  # one's complement magnitude, 0..4095
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")  # never 8 for 13-bit input
    code = (seg << 4) | ((mag >> np.maximum(seg, 1)) & 0x0F)
    code ^= np.where(negative, 0x55, 0xD5)
    return code.astype(np.uint8).tobytes()


def alaw_decode_int16(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode A-law code bytes to int16 samples."""
    return _ALAW_TABLE[_codes(data)]


# --- float API --------------------------------------------------------------------------------


def _float_to_int16(x: np.ndarray) -> np.ndarray:
    arr = np.nan_to_num(np.asarray(x, dtype=np.float32).reshape(-1), nan=0.0)
    return np.clip(np.rint(arr.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def ulaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode mu-law code bytes to float32 samples in [-1, 1) (int16 / 32768)."""
    return ulaw_decode_int16(data).astype(np.float32) / np.float32(32768.0)


def ulaw_encode(x: np.ndarray) -> bytes:
    """Encode float samples in [-1, 1] (clipped) to mu-law code bytes."""
    return ulaw_encode_int16(_float_to_int16(x))


def alaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode A-law code bytes to float32 samples in [-1, 1) (int16 / 32768)."""
    return alaw_decode_int16(data).astype(np.float32) / np.float32(32768.0)


def alaw_encode(x: np.ndarray) -> bytes:
    """Encode float samples in [-1, 1] (clipped) to A-law code bytes."""
    return alaw_encode_int16(_float_to_int16(x))


FORMATS: dict[str, tuple[Callable[[bytes], np.ndarray], Callable[[np.ndarray], bytes]]] = {
    "audio/pcmu": (ulaw_decode, ulaw_encode),
    "audio/pcma": (alaw_decode, alaw_encode),
}


class G711Encoder:
    """One response's output audio: 24 kHz PCM16 chunks -> 8 kHz G.711 bytes (a streaming soxr
    resampler, so chunk edges are seamless); `flush` gives the resampler's tail at the end."""

    def __init__(self, fmt: str, in_rate: int = 24000) -> None:
        self._encode = FORMATS[fmt][1]
        self._resampler = soxr.ResampleStream(in_rate, G711_RATE, 1, dtype="float32")

    def encode(self, pcm16: bytes) -> bytes:
        audio = np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0
        return self._encode(np.asarray(self._resampler.resample_chunk(audio)))

    def flush(self) -> bytes:
        return self._encode(np.asarray(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)))
