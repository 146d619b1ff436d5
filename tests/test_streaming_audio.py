"""Streamed SNAC decoding equals a one-shot decode; input audio handling; VAD boundaries."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from model.codec import SnacCodec
from streaming.audio_in import AudioHistory, InputResampler, InvalidAudio, decode_pcm16
from streaming.audio_out import StreamingSnacDecoder
from streaming.config import TurnDetection
from streaming.vad import WINDOW, TurnDetector

from .conftest import fixture_audio


@pytest.fixture(scope="module")
def codec(tiny_ckpt) -> SnacCodec:
    return SnacCodec.from_dir(tiny_ckpt / "snac")


def _frames(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 4096, (n, 7), generator=torch.Generator().manual_seed(seed))


def _stream(codec: SnacCodec, frames: torch.Tensor, **kw) -> tuple[np.ndarray, list[int]]:
    dec = StreamingSnacDecoder(codec, 4096, **kw)
    chunks = []
    for f in frames.tolist():
        chunks += dec.push(f)
    chunks += dec.flush()
    return np.concatenate(chunks), [c.size for c in chunks]


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 5, 17])
def test_streamed_audio_equals_one_shot_decode(codec: SnacCodec, chunk: int, n: int) -> None:
    frames = _frames(n, seed=n)
    one_shot = codec.decode(frames)
    streamed, sizes = _stream(codec, frames, chunk_frames=chunk)
    assert streamed.shape == one_shot.shape  # the tail is there too
    assert np.max(np.abs(streamed - one_shot)) <= 1e-3 * np.max(np.abs(one_shot))
    assert all(s == chunk * 2048 for s in sizes[:-1])


def test_growing_chunks_stay_exact(codec: SnacCodec) -> None:
    frames = _frames(23, seed=5)
    one_shot = codec.decode(frames)
    streamed, sizes = _stream(codec, frames, chunk_frames=1, max_chunk_frames=4)
    assert [s // 2048 for s in sizes[:4]] == [1, 2, 4, 4]  # fast first audio, then fewer windows
    assert sum(sizes) == one_shot.size
    assert np.max(np.abs(streamed - one_shot)) <= 1e-3 * np.max(np.abs(one_shot))


def test_without_lookahead_the_edges_are_wrong(codec: SnacCodec) -> None:
    """Why the default lookahead is 3: SNAC's decoder looks ahead, so no lookahead is not exact."""
    frames = _frames(12, seed=3)
    one_shot = codec.decode(frames)
    streamed, _ = _stream(codec, frames, lookahead=0, left_context=0)
    assert np.max(np.abs(streamed - one_shot)) > 1e-2 * np.max(np.abs(one_shot))


@pytest.mark.parametrize("first_lookahead", [0, 1, 2])
def test_fast_start_is_exact_from_the_second_chunk(codec: SnacCodec, first_lookahead: int) -> None:
    """Opt-in fast start: the first chunk comes after 1 + first_lookahead frames instead of 1 + 3;
    only its own audio is approximate."""
    frames = _frames(20, seed=7)
    one_shot = codec.decode(frames)
    dec = StreamingSnacDecoder(codec, 4096, chunk_frames=1, max_chunk_frames=4, first_lookahead=first_lookahead)
    pushed_before_first = next(i + 1 for i, f in enumerate(frames.tolist()) if dec.push(f))
    assert pushed_before_first == 1 + first_lookahead
    streamed, sizes = _stream(codec, frames, chunk_frames=1, max_chunk_frames=4, first_lookahead=first_lookahead)
    assert streamed.shape == one_shot.shape
    peak = np.max(np.abs(one_shot))
    first = sizes[0]
    assert np.max(np.abs(streamed[first:] - one_shot[first:])) <= 1e-3 * peak  # exact from the second chunk
    if first_lookahead == 0:  # the price: an approximate start (with more lookahead it shrinks)
        assert np.max(np.abs(streamed[:first] - one_shot[:first])) > 1e-3 * peak


def test_specials_in_streamed_frames_are_replaced(codec: SnacCodec) -> None:
    frames = _frames(6)
    frames[2, 3] = 4097  # _pad_a: takes the previous frame's code
    expected = frames.clone()
    expected[2, 3] = frames[1, 3]
    streamed, _ = _stream(codec, frames)
    ref = codec.decode(expected)
    assert np.max(np.abs(streamed - ref)) <= 1e-3 * np.max(np.abs(ref))


def test_decoder_keeps_only_its_context(codec: SnacCodec) -> None:
    dec = StreamingSnacDecoder(codec, 4096)
    for f in _frames(40).tolist():
        dec.push(f)
    assert len(dec._frames) <= dec.span - 1 + dec.max_chunk + dec.lookahead  # context + what waits


@pytest.mark.parametrize("n", [5, 11, 40])
def test_windows_have_one_size_once_there_are_enough_frames(codec: SnacCodec, n: int) -> None:
    """oneDNN builds kernels per input shape: every window (the final ones too) is `span`
    frames once the answer has that many, and the stream still equals the one-shot decode."""
    dec = StreamingSnacDecoder(codec, 4096, chunk_frames=1, max_chunk_frames=4)
    sizes: list[tuple[int, int]] = []  # (frames available, window size)
    out = []
    frames = _frames(n)
    for i, f in enumerate(frames.tolist()):
        dec.add(f)
        while (w := dec.ready_window()) is not None:
            sizes.append((i + 1, w.size))
            out.append(w.take(codec.decode(w.frames())))
    while (w := dec.ready_window(final=True)) is not None:
        sizes.append((n, w.size))
        out.append(w.take(codec.decode(w.frames())))
    assert all(size == dec.span for available, size in sizes if available >= dec.span)
    assert all(size == available for available, size in sizes if available < dec.span)
    ref = codec.decode(frames)
    streamed = np.concatenate(out)
    assert streamed.shape == ref.shape and np.max(np.abs(streamed - ref)) <= 1e-3 * np.max(np.abs(ref))


def test_pcm16_decoding_and_errors() -> None:
    pcm = np.array([0, 16384, -32768, 32767], dtype="<i2").tobytes()
    assert decode_pcm16(pcm).tolist() == [0.0, 0.5, -1.0, 32767 / 32768]
    assert decode_pcm16(b"").size == 0
    with pytest.raises(InvalidAudio, match="even number of bytes"):
        decode_pcm16(b"\x00\x01\x02")


def test_resampler_any_chunking_gives_the_same_audio() -> None:
    t = np.arange(24000) / 24000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    whole = InputResampler(24000)
    a = np.concatenate([whole.process(audio), whole.flush()])
    pieces = InputResampler(24000)
    cuts = [0, 1, 7, 480, 481, 5000, 24000]
    b = np.concatenate([pieces.process(audio[i:j]) for i, j in itertools.pairwise(cuts)] + [pieces.flush()])
    assert a.size == b.size and abs(a.size - 16000) <= 1
    assert np.allclose(a, b, atol=1e-6)


def _speech_bounds(audio: np.ndarray, thresh: float = 0.02) -> tuple[int, int]:
    loud = np.flatnonzero(np.abs(audio) > thresh)
    return int(loud[0]), int(loud[-1])


def test_audio_history_keeps_the_tail_at_its_absolute_positions() -> None:
    """Chunks of every size (empty, small, over the whole kept span) against the plain
    concatenation: slices by absolute sample index are identical, at least `keep` is kept."""
    rng = np.random.default_rng(0)
    history, everything = AudioHistory(1000), np.zeros(0, np.float32)
    for i in range(3000):
        chunk = rng.standard_normal(int(rng.integers(0, 1500 if i % 50 == 0 else 120))).astype(np.float32)
        history.append(chunk)
        everything = np.concatenate([everything, chunk])
        assert history.end == everything.size
        assert min(everything.size, 1000) <= history.end - history.start <= 1250
        begin = int(rng.integers(history.start - 50, history.end + 10))
        end = int(rng.integers(begin, history.end + 50))
        lo, hi = max(begin, history.start), min(end, history.end)
        assert np.array_equal(history.slice(begin, end), everything[lo:hi] if hi > lo else np.zeros(0))


def test_vad_turn_boundaries_land_near_the_speech(vad) -> None:
    q = fixture_audio("question")
    lead, tail = 16000, 24000
    audio = np.concatenate([np.zeros(lead, np.float32), q, np.zeros(tail, np.float32)])
    first, last = _speech_bounds(audio)
    stream, turns = vad.stream(), TurnDetector(TurnDetection())
    edges = []
    for start in range(0, audio.size - WINDOW + 1, WINDOW):
        edge = turns.update(stream.prob(audio[start : start + WINDOW]), start)
        if edge:
            edges.append(edge)
    assert [e.kind for e in edges] == ["start", "stop"]
    # Stated tolerances: start within 100 ms of the first loud sample, end within 200 ms of the last.
    assert abs(edges[0].sample - first) <= 1600
    assert abs(edges[1].sample - last) <= 3200


@pytest.mark.parametrize("name", ["silence", "noise"])
def test_vad_ignores_silence_and_noise(vad, name: str) -> None:
    audio = np.tile(fixture_audio(name), 3)
    stream, turns = vad.stream(), TurnDetector(TurnDetection())
    edges = [turns.update(stream.prob(audio[s : s + WINDOW]), s) for s in range(0, audio.size - WINDOW + 1, WINDOW)]
    assert not any(edges)


def test_windows_of_several_answers_decode_together_exactly(codec: SnacCodec) -> None:
    from streaming.audio_out import decode_windows

    seqs = [_frames(n, seed=10 + n) for n in (9, 14, 21)]
    decoders = [StreamingSnacDecoder(codec, 4096, chunk_frames=1, max_chunk_frames=4) for _ in seqs]
    outs: list[list[np.ndarray]] = [[] for _ in seqs]
    for step in range(max(len(s) for s in seqs)):
        for d, s in zip(decoders, seqs, strict=True):
            if step < len(s):
                d.add(s[step].tolist())
        while True:
            ready = [(i, w) for i, d in enumerate(decoders) if (w := d.ready_window()) is not None]
            if not ready:
                break
            for (i, _), chunk in zip(ready, decode_windows(codec, [w for _, w in ready]), strict=True):
                outs[i].append(chunk)
    for i, d in enumerate(decoders):
        outs[i] += d.flush()
        one_shot = codec.decode(seqs[i])
        streamed = np.concatenate(outs[i])
        assert streamed.shape == one_shot.shape
        assert np.max(np.abs(streamed - one_shot)) <= 1e-3 * np.max(np.abs(one_shot))
