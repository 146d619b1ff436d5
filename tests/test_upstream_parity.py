"""Token-exact parity with upstream Mini-Omni, against recorded upstream outputs.

tests/fixtures/upstream_tiny_seed0.json holds what upstream gpt-omni/mini-omni's own
generate functions produced on `make-checkpoint --size tiny --seed 0` (its `about` field
says how; benchmarks/parity.py compares live runs). If the random checkpoint recipe ever
changes, regenerate it by running upstream again: never by copying our own output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.parity import UPSTREAM_TASKS, our_steps
from model.omni import OmniModel

from .conftest import FIXTURES

UPSTREAM = json.loads((FIXTURES / "upstream_tiny_seed0.json").read_text())["tasks"]


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_tokens_identical_to_upstream(tiny_model: OmniModel, question_audio, name: str) -> None:
    task = UPSTREAM_TASKS[name]
    ours, result = our_steps(tiny_model, task, question_audio, "What is your name?")
    expected = UPSTREAM[name]["tokens"] if task.audio_out else [UPSTREAM[name]["tokens"]]
    assert result.num_steps == UPSTREAM[name]["n_steps"]
    assert ours == expected
    if "snac_float_samples_2048_4096" in UPSTREAM[name]:
        audio = tiny_model.decode_frames(result.frames)
        ref = np.array(UPSTREAM[name]["snac_float_samples_2048_4096"], dtype=np.float32)
        assert np.max(np.abs(audio[2048:4096] - ref)) * 32767 <= 1.0  # within 1 LSB of int16
