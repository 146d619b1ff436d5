"""G.711 mu-law / A-law codecs: bit-exact with the stdlib ``audioop`` reference (Python 3.11)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest

from streaming.g711 import (
    FORMATS,
    G711_RATE,
    alaw_decode,
    alaw_decode_int16,
    alaw_encode,
    alaw_encode_int16,
    ulaw_decode,
    ulaw_decode_int16,
    ulaw_encode,
    ulaw_encode_int16,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    audioop = pytest.importorskip("audioop")  # removed in Python 3.13

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = bytes(range(256))

LAWS = {
    "ulaw": (ulaw_encode_int16, ulaw_decode_int16, ulaw_encode, ulaw_decode, "lin2ulaw", "ulaw2lin"),
    "alaw": (alaw_encode_int16, alaw_decode_int16, alaw_encode, alaw_decode, "lin2alaw", "alaw2lin"),
}


def _reference(name: str, data: bytes) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bytes(getattr(audioop, name)(data, 2))


@pytest.mark.parametrize("law", LAWS)
def test_encode_matches_audioop_for_every_int16(law: str) -> None:
    encode_int16, _, encode, _, lin2law, _ = LAWS[law]
    expected = _reference(lin2law, ALL_INT16.astype("<i2").tobytes())
    assert encode_int16(ALL_INT16) == expected
    # the float API is int16 / 32768 and must give the same codes
    assert encode(ALL_INT16.astype(np.float32) / np.float32(32768.0)) == expected


@pytest.mark.parametrize("law", LAWS)
def test_decode_matches_audioop_for_every_code(law: str) -> None:
    _, decode_int16, _, decode, _, law2lin = LAWS[law]
    expected = np.frombuffer(_reference(law2lin, ALL_CODES), dtype="<i2")
    got = decode_int16(ALL_CODES)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, expected)
    as_float = decode(ALL_CODES)
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(as_float, expected.astype(np.float32) / np.float32(32768.0))
    assert as_float.min() >= -1.0 and as_float.max() < 1.0


@pytest.mark.parametrize("law", LAWS)
def test_every_code_survives_decode_then_encode(law: str) -> None:
    encode_int16, decode_int16, encode, decode, _, _ = LAWS[law]
    # mu-law has two zeros (0x7F and 0xFF); both decode to 0, which encodes to 0xFF
    codes = np.frombuffer(ALL_CODES, dtype=np.uint8)
    expected = np.where(codes == 0x7F, 0xFF, codes).astype(np.uint8).tobytes() if law == "ulaw" else ALL_CODES
    assert encode(decode(ALL_CODES)) == expected
    assert encode_int16(decode_int16(ALL_CODES)) == expected


@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize(("amplitude", "min_snr_db"), [(0.9, 35.0), (0.5, 35.0), (0.01, 30.0)])
def test_sine_round_trip_snr(law: str, amplitude: float, min_snr_db: float) -> None:
    """About 38 dB at any level (companding): lossy, but far above 8-bit linear PCM for quiet audio."""
    _, _, encode, decode, _, _ = LAWS[law]
    t = np.arange(G711_RATE, dtype=np.float64) / G711_RATE
    x = (amplitude * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    code = encode(x)
    assert len(code) == x.size  # one byte per sample
    y = decode(code)
    snr = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - y).astype(np.float64) ** 2))
    assert min_snr_db < snr < 42.0


@pytest.mark.parametrize("law", LAWS)
def test_empty_input(law: str) -> None:
    encode_int16, decode_int16, encode, decode, _, _ = LAWS[law]
    assert encode(np.zeros(0, np.float32)) == b""
    assert encode_int16(np.zeros(0, np.int16)) == b""
    assert decode(b"").dtype == np.float32 and decode(b"").size == 0
    assert decode_int16(b"").dtype == np.int16 and decode_int16(b"").size == 0


@pytest.mark.parametrize("law", LAWS)
def test_float_encode_clips_and_handles_nan(law: str) -> None:
    encode_int16, _, encode, _, _, _ = LAWS[law]
    x = np.array([-5.0, -1.0, 1.0, 5.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    extremes = np.array([-32768, -32768, 32767, 32767, 0, 32767, -32768], dtype=np.int16)
    assert encode(x) == encode_int16(extremes)


def test_int16_encode_rejects_other_dtypes() -> None:
    with pytest.raises(TypeError):
        ulaw_encode_int16(np.zeros(4, np.float32))
    with pytest.raises(TypeError):
        alaw_encode_int16(np.zeros(4, np.int32))


def test_formats_table() -> None:
    assert G711_RATE == 8000
    pairs: dict[str, tuple[Callable[[bytes], np.ndarray], Callable[[np.ndarray], bytes]]] = FORMATS
    assert pairs == {"audio/pcmu": (ulaw_decode, ulaw_encode), "audio/pcma": (alaw_decode, alaw_encode)}
