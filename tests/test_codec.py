"""De-delay, SNAC frame mapping, the non-code rule and deterministic decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.codec import (
    SnacCodec,
    _snake,
    codes_to_frames,
    dedelay,
    delay,
    frames_to_codes,
    replace_non_codes,
    to_pcm16,
)


def test_dedelay_drops_i_plus_1_and_keeps_n() -> None:
    steps = 10
    layers = torch.stack([torch.arange(steps) + 100 * i for i in range(7)])  # token = 100*layer + step
    frames = dedelay(layers)
    assert frames.shape == (3, 7)  # N = S - 7
    # frame f, layer i was generated at step f + i + 1
    assert frames[0].tolist() == [1, 102, 203, 304, 405, 506, 607]
    assert frames[2].tolist() == [3, 104, 205, 306, 407, 508, 609]
    assert dedelay(layers[:, :7]).shape == (0, 7)


@given(st.lists(st.lists(st.integers(0, 4095), min_size=7, max_size=7), min_size=0, max_size=20))
@settings(max_examples=50, deadline=None)
def test_delay_dedelay_round_trip(rows: list[list[int]]) -> None:
    frames = torch.tensor(rows, dtype=torch.long).reshape(-1, 7)
    assert torch.equal(dedelay(delay(frames, fill=4097)), frames)


def test_frame_to_snac_codebook_mapping() -> None:
    frames = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15, 16]])
    c0, c1, c2 = frames_to_codes(frames)
    assert c0.tolist() == [[0, 10]]
    assert c1.tolist() == [[1, 4, 11, 14]]
    assert c2.tolist() == [[2, 3, 5, 6, 12, 13, 15, 16]]
    assert torch.equal(codes_to_frames([c0, c1, c2]), frames)


def test_non_codes_take_the_previous_frames_code() -> None:
    frames = torch.tensor([[4097, 5, 6, 7, 8, 9, 10], [1, 4096, 6, 4159, 8, 9, 10], [2, 3, 4100, 7, 8, 9, 10]])
    fixed = replace_non_codes(frames, 4096)
    assert fixed.tolist() == [[0, 5, 6, 7, 8, 9, 10], [1, 5, 6, 7, 8, 9, 10], [2, 3, 6, 7, 8, 9, 10]]
    prev = torch.tensor([9, 9, 9, 9, 9, 9, 9])
    assert replace_non_codes(frames[:1], 4096, previous=prev)[0, 0] == 9
    assert frames[0, 0] == 4097  # input untouched


def test_to_pcm16_clips_and_rounds() -> None:
    assert to_pcm16(np.array([0.0, 1.0, -1.0, 2.0, 0.5 / 32767])).tolist() == [0, 32767, -32767, 32767, 0]


@pytest.fixture(scope="module")
def codec(tiny_ckpt) -> SnacCodec:
    return SnacCodec.from_dir(tiny_ckpt / "snac")


def test_snac_decode_is_deterministic_with_noise_off(codec: SnacCodec) -> None:
    frames = torch.randint(0, 4096, (5, 7), generator=torch.Generator().manual_seed(1))
    a, b = codec.decode(frames), codec.decode(frames)
    assert a.shape == (5 * 2048,)
    assert np.array_equal(a, b)
    codec.set_noise(True)
    try:
        assert not np.array_equal(codec.decode(frames), a)
    finally:
        codec.set_noise(False)
    assert np.array_equal(codec.decode(frames), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snac_decode_equals_the_snac_packages_own_forward(tiny_ckpt, dtype: torch.dtype) -> None:
    """Our in-place Snake activation is SNAC's bit for bit, in fp32 and bf16: the whole decode
    equals the package's, and so does the activation on its own."""
    from snac.layers import Snake1d, snake

    ours, theirs = SnacCodec.from_dir(tiny_ckpt / "snac").cast_(dtype), SnacCodec.from_dir(tiny_ckpt / "snac")
    theirs.cast_(dtype)
    snakes = [m for m in theirs.snac.modules() if isinstance(m, Snake1d)]
    assert snakes and all("forward" in m.__dict__ for m in snakes)  # ours replaced them
    for m in snakes:
        del m.forward  # back to the package's
    frames = torch.randint(0, 4096, (9, 7), generator=torch.Generator().manual_seed(3))
    assert np.array_equal(ours.decode(frames), theirs.decode(frames))
    g = torch.Generator().manual_seed(4)
    x, alpha = torch.randn(2, 8, 300, generator=g).to(dtype), (torch.rand(1, 8, 1, generator=g) + 0.2).to(dtype)
    assert torch.equal(_snake(alpha, x), snake(x, alpha))


def test_snac_loads_legacy_weight_norm_names(tiny_ckpt) -> None:
    sd = torch.load(tiny_ckpt / "snac" / "pytorch_model.bin", weights_only=True)
    assert any(k.endswith("weight_g") for k in sd) and not any("parametrizations" in k for k in sd)
    cfg = json.loads((tiny_ckpt / "snac" / "config.json").read_text())
    assert cfg["vq_strides"] == [4, 2, 1] and cfg["sampling_rate"] == 24000
