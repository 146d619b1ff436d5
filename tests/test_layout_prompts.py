"""Token layout ids and per-task prompts against literal id lists."""

from __future__ import annotations

import pytest
import torch

from model.config import FULL_CONFIG
from model.prompts import Task, build_prompt

LAYOUT = FULL_CONFIG.layout


def test_special_ids_are_the_upstream_values() -> None:
    assert (LAYOUT.eot, LAYOUT.pad_t, LAYOUT.input_t, LAYOUT.answer_t, LAYOUT.asr) == (
        151936,
        151937,
        151938,
        151939,
        151940,
    )
    assert (LAYOUT.eoa, LAYOUT.pad_a, LAYOUT.input_a, LAYOUT.answer_a, LAYOUT.split) == (4096, 4097, 4098, 4099, 4100)
    assert (LAYOUT.image, LAYOUT.eoimage) == (4101, 4102)
    assert LAYOUT.padded_vocab_size == 181120
    assert [LAYOUT.audio_shift(i) for i in range(7)] == [152000, 156160, 160320, 164480, 168640, 172800, 176960]
    assert LAYOUT.audio_global(4097, 6) == 4097 + 152000 + 4160 * 6
    assert LAYOUT.audio_logits_range == (152000, 181120)


def _audio_row(layer: int, local: list[int]) -> list[int]:
    return [a + 152000 + 4160 * layer for a in local]


# L = 2 Whisper frames: T = L + 3 = 5 positions.
A_IN = [4098, 4097, 4097, 4096]
T_IN = [151938, 151937, 151937, 151936]


@pytest.mark.parametrize(
    ("task", "rows"),
    [
        (Task.A1A2, [([*A_IN, 4099], [*T_IN, 151939]), ([*A_IN, 4097], [*T_IN, 151939])]),
        (Task.A1A2_SINGLE, [([*A_IN, 4099], [*T_IN, 151939])]),
        (Task.A1T2, [([*A_IN, 4097], [*T_IN, 151939])]),
        (Task.A1T1, [([*A_IN, 4097], [*T_IN, 151940])]),
    ],
)
def test_audio_in_prompts(task: Task, rows: list[tuple[list[int], list[int]]]) -> None:
    feats = torch.randn(2, 768)
    p = build_prompt(task, LAYOUT, audio_features=feats)
    assert p.ids.shape == (len(rows), 8, 5)
    for r, (audio, text) in enumerate(rows):
        for layer in range(7):
            assert p.ids[r, layer].tolist() == _audio_row(layer, audio)
        assert p.ids[r, 7].tolist() == text
    (splice,) = p.splices
    assert splice.start == 1 and splice.features.shape == (len(rows), 2, 768)
    assert (p.audio_row, p.text_row) == ((0, 1) if task is Task.A1A2 else (0, 0))


def test_text_in_prompts() -> None:
    ids = [11, 22, 33]
    ta = build_prompt(Task.T1A2, LAYOUT, text_ids=ids)
    assert ta.ids.shape == (1, 8, 6)
    for layer in range(7):
        assert ta.ids[0, layer].tolist() == _audio_row(layer, [4097, 4097, 4097, 4097, 4097, 4099])
    assert ta.ids[0, 7].tolist() == [151938, 11, 22, 33, 151936, 151939]
    tt = build_prompt(Task.T1T2, LAYOUT, text_ids=ids)
    for layer in range(7):
        assert tt.ids[0, layer].tolist() == _audio_row(layer, [4097] * 6)
    assert tt.ids[0, 7].tolist() == [151938, 11, 22, 33, 151936, 151939]
    assert ta.splices == () and tt.splices == ()


def test_prompt_needs_its_input() -> None:
    with pytest.raises(ValueError, match="needs audio"):
        build_prompt(Task.A1T2, LAYOUT, text_ids=[1])
    with pytest.raises(ValueError, match="needs text"):
        build_prompt(Task.T1T2, LAYOUT, audio_features=torch.zeros(2, 4))
