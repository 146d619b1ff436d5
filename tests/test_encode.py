"""The Whisper encode: the padded window stays exact; the opt-in trimmed window keeps the prompt's
L frames and differs from the padded encode only through attention."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from model.audio import SAMPLE_RATE, WhisperDims, WhisperEncoder, feature_frames, log_mel
from model.config import WHISPER_WINDOWS
from model.errors import InputError
from model.omni import OmniModel
from omnivox.cli import build_parser
from server.settings import ServerSettings

from .conftest import fixture_audio


@pytest.fixture(scope="module")
def audios() -> dict[str, np.ndarray]:
    return {name: fixture_audio(name) for name in ("question", "weather")}


def test_padded_is_the_default_and_openai_whispers_forward(tiny_model: OmniModel, audios) -> None:
    whisper = tiny_model.whisper
    assert whisper is not None and tiny_model.whisper_window == "padded"
    for audio in audios.values():
        mel = log_mel(audio)[None]
        assert mel.shape[-1] == 3000
        with torch.inference_mode():
            ref = whisper.encoder(mel)  # openai-whisper's AudioEncoder.forward, as before
        n = feature_frames(audio.size)
        assert torch.equal(whisper(mel), ref)
        assert torch.equal(tiny_model.encode_audio(audio), ref[0, :n])
        assert torch.equal(whisper.encode(audio), whisper.encode(audio, "padded"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeping_the_first_frames_changes_no_value(audios, dtype: torch.dtype) -> None:
    """forward(keep=n) skips the last block's other rows: the kept rows are bit-identical."""
    torch.manual_seed(0)
    for layers in (0, 1, 3):
        whisper = WhisperEncoder(WhisperDims(80, 1500, 64, 2, layers)).eval().cast_(dtype)
        for audio in audios.values():
            mel = log_mel(audio)[None]
            n = feature_frames(audio.size)
            full = whisper(mel)
            assert torch.equal(whisper(mel, keep=n), full[:, :n])
            assert torch.equal(whisper(mel, keep=1500), full) and torch.equal(whisper(mel, keep=4000), full)
            assert torch.equal(whisper.encode(audio), full[0, :n])


@pytest.mark.parametrize("samples", [1, 319, 320, 21457, SAMPLE_RATE * 29 + 5])
def test_short_log_mel_is_the_padded_log_mel_cut(samples: int) -> None:
    audio = np.random.default_rng(samples).standard_normal(samples).astype(np.float32) * 0.1
    full = log_mel(audio)
    frames = min(2 * (feature_frames(samples) + 1), 3000)
    # the same frames up to float rounding (the FFT and mel matmul run on other lengths: 1 ulp
    # seen below 40 ms of audio); a wrong floor or padding would be off by far more
    torch.testing.assert_close(log_mel(audio, frames=frames), full[:, :frames], rtol=0, atol=1e-6)
    if samples > 160:  # audio longer than the one frame asked for: the 30 s log-mel's, floor included
        assert torch.equal(log_mel(audio, frames=1), full[:, :1])


def test_trimmed_keeps_l_frames_and_only_attention_differs(audios) -> None:
    torch.manual_seed(0)
    whisper = WhisperEncoder(WhisperDims(80, 1500, 64, 2, 2)).eval()
    stem = WhisperEncoder(WhisperDims(80, 1500, 64, 2, 0)).eval()  # no attention: frames are independent
    stem.encoder.load_state_dict(whisper.encoder.state_dict(), strict=False)
    for audio in audios.values():
        n = feature_frames(audio.size)
        padded, trimmed = whisper.encode(audio, "padded"), whisper.encode(audio, "trimmed")
        assert padded.shape == trimmed.shape == (n, 64)
        assert not torch.allclose(padded, trimmed)  # global attention sees 1500 frames vs n + 1
        # Without attention every kept frame, the last included (the conv's right neighbour), matches.
        torch.testing.assert_close(stem.encode(audio, "trimmed"), stem.encode(audio, "padded"), rtol=0, atol=1e-5)


def test_trimmed_is_the_padded_encode_for_a_full_window() -> None:
    torch.manual_seed(0)
    whisper = WhisperEncoder(WhisperDims(80, 1500, 64, 2, 2)).eval()
    audio = np.random.default_rng(0).standard_normal(30 * SAMPLE_RATE).astype(np.float32) * 0.1
    assert torch.equal(whisper.encode(audio, "trimmed"), whisper.encode(audio, "padded"))


def test_load_takes_the_window(tiny_ckpt: Path, tiny_model: OmniModel, audios, caplog) -> None:
    with caplog.at_level("WARNING", logger="model.omni"):
        model = OmniModel.load(tiny_ckpt, with_snac=False, whisper_window="trimmed")
    assert any("whisper window trimmed" in r.getMessage() for r in caplog.records)
    assert model.whisper is not None and model.whisper_window == "trimmed"
    audio = audios["question"]
    assert torch.equal(model.encode_audio(audio), model.whisper.encode(audio, "trimmed"))
    assert model.encode_audio(audio).shape == tiny_model.encode_audio(audio).shape
    with pytest.raises(InputError, match="whisper_window"):
        OmniModel.load(tiny_ckpt, with_snac=False, whisper_window="short")
    with pytest.raises(InputError, match="whisper window"):
        model.whisper.encode(audio, "short")


def test_window_reaches_generate_and_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_args(ServerSettings.model_fields["whisper_window"].annotation) == WHISPER_WINDOWS
    assert ServerSettings().whisper_window == "padded"
    monkeypatch.setenv("OMNIVOX_WHISPER_WINDOW", "trimmed")
    assert ServerSettings().whisper_window == "trimmed"
    monkeypatch.setenv("OMNIVOX_WHISPER_WINDOW", "short")
    with pytest.raises(ValueError, match="whisper_window"):
        ServerSettings()
    parser = build_parser()
    generate = ["generate", "--input-text", "hi"]
    assert parser.parse_args(generate).whisper_window == "padded"
    assert parser.parse_args([*generate, "--whisper-window", "trimmed"]).whisper_window == "trimmed"
    assert parser.parse_args(["serve", "--whisper-window", "trimmed"]).whisper_window == "trimmed"
    assert parser.parse_args(["serve"]).whisper_window is None  # then the environment / default decides


def test_bench_encode_reports_every_variant(tiny_ckpt: Path, tmp_path: Path) -> None:
    import json

    from omnivox.cli import main

    out = tmp_path / "encode.json"
    assert main(["bench", "encode", "--checkpoint-dir", str(tiny_ckpt), "--repeats", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["machine"]) >= {"cpu_model", "cores", "torch", "threads"}
    rows = {(r["precision"], r["window"], r["audio"]): r for r in doc["rows"]}
    assert len(rows) == 4 * 2 * 2
    for audio, name in ((fixture_audio("question"), "question"), (fixture_audio("weather"), "weather")):
        exact = rows[("float32", "padded", name)]
        assert exact["max_rel"] == 0 and exact["cos_min"] == 1
        for precision in ("bfloat16", "int8", "int8-dynamic"):  # on random weights all stay close to fp32
            row = rows[(precision, "padded", name)]
            assert row["mean_rel"] < 0.01 and row["max_rel"] < 0.1 and row["cos_min"] > 0.999, row
        for precision in ("float32", "bfloat16", "int8", "int8-dynamic"):
            assert rows[(precision, "trimmed", name)]["frames"] == feature_frames(audio.size)


def test_generate_and_serve_load_the_window(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omnivox.cli import main
    from server.serve import build_engine

    from .conftest import FIXTURES

    windows: list[str] = []
    load = OmniModel.load.__func__  # type: ignore[attr-defined]

    def recording_load(cls, *args, **kwargs):
        model = load(cls, *args, **kwargs)
        windows.append(model.whisper_window)
        return model

    monkeypatch.setattr(OmniModel, "load", classmethod(recording_load))
    wav = str(FIXTURES / "question.wav")
    assert main(["generate", "--checkpoint-dir", str(tiny_ckpt), "--task", "a1t1", "--input-wav", wav,
                 "--max-new-tokens", "2", "--whisper-window", "trimmed"]) == 0  # fmt: skip
    settings = ServerSettings(checkpoint_dir=tiny_ckpt, whisper_window="trimmed", interrupt_detector=False,
                              turn_model=False)  # fmt: skip
    build_engine(settings).close()
    assert windows == ["trimmed", "trimmed"]
