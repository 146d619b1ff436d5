"""Mini-Omni2: checkpoint detection, CLIP as the release runs it, the image prompt, upstream
parity of the image task, image decoding limits, and `generate --input-image`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import CheckpointError, InputError
from model.omni import OmniModel
from model.prompts import Task, build_prompt
from model.vision import (
    CLIP_FILE,
    ImageError,
    decode_image,
    load_clip,
    open_image_file,
    preprocess,
    read_clip_state_dict,
)

from .conftest import FIXTURES

PICTURE = FIXTURES / "picture.png"
UPSTREAM = json.loads((FIXTURES / "upstream_omni2_tiny_seed0.json").read_text())


def test_checkpoints_are_told_apart_by_their_vision_adapter(tiny_model: OmniModel, tiny2_model: OmniModel) -> None:
    assert tiny_model.family == "mini-omni" and not tiny_model.takes_images and tiny_model.clip is None
    assert tiny2_model.family == "mini-omni2" and tiny2_model.takes_images and tiny2_model.clip is not None
    assert tiny2_model.llm.vision_adapter is not None and tiny_model.llm.vision_adapter is None
    with pytest.raises(InputError, match="takes no images"):
        tiny_model.encode_image(open_image_file(PICTURE))


def test_make_checkpoint_writes_the_mini_omni2_release_layout(tiny2_ckpt: Path) -> None:
    assert (tiny2_ckpt / "small.pt").is_file() and not (tiny2_ckpt / "whisper").exists()
    assert (tiny2_ckpt / CLIP_FILE).is_file()
    # OpenAI's file format: a TorchScript archive with OpenAI CLIP names, incl. the text tower
    scripted = torch.jit.load(str(tiny2_ckpt / CLIP_FILE), map_location="cpu")
    names = set(scripted.state_dict())
    assert {"visual.conv1.weight", "visual.proj", "visual.transformer.resblocks.1.attn.in_proj_weight",
            "token_embedding.weight", "text_projection", "ln_final.weight", "input_resolution"} <= names  # fmt: skip
    cfg = (tiny2_ckpt / "model_config.yaml").read_text()
    assert "vision_adapter_dim: 32" in cfg
    lit = torch.load(tiny2_ckpt / "lit_model.pth", map_location="cpu", weights_only=True)
    assert lit["vision_adapter.fc_1.weight"].shape == (128, 32)
    assert lit["vision_adapter.proj.weight"].shape == (64, 128)


def test_missing_clip_weights_fall_back_then_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import model.vision as vision

    monkeypatch.setattr(vision, "clip_cache_file", lambda: tmp_path / "cache" / CLIP_FILE)

    def offline(url: str, target: Path) -> None:
        raise OSError("network unreachable")

    with pytest.raises(CheckpointError, match=r"CLIP weights not found.*network unreachable"):
        load_clip(tmp_path, fetch=offline)
    with pytest.raises(CheckpointError, match="missing"):
        read_clip_state_dict(tmp_path / "nope.pt")


def test_preprocessing_equals_the_release_pixels_and_features() -> None:
    """Pixels bit for bit, features to float rounding, against values recorded from upstream."""
    x = preprocess(open_image_file(PICTURE))
    rec = UPSTREAM["clip"]
    assert x.shape == (3, 224, 224)
    assert x[0, 0, :8].tolist() == rec["pixels_first8_c0_row0"]
    assert float(x.double().sum()) == pytest.approx(rec["pixels_sum"], abs=1e-6)


def test_clip_features_match_upstream_and_weights_are_rounded_like_openai_loader(tiny2_model: OmniModel) -> None:
    feats = tiny2_model.encode_image(open_image_file(PICTURE))
    rec = UPSTREAM["clip"]
    assert list(feats.shape) == rec["features_shape"] == [50, 32]
    np.testing.assert_allclose(feats[0, :8].numpy(), rec["features0_first8"], atol=1e-5)
    np.testing.assert_allclose(feats[49, :8].numpy(), rec["features49_first8"], atol=1e-5)
    clip = tiny2_model.clip
    assert clip is not None
    fc1 = clip.vision.encoder.layers[0].mlp.fc1.weight
    assert torch.equal(fc1, fc1.half().float())  # rounded through fp16, as OpenAI's loader does
    ln = clip.vision.encoder.layers[0].layer_norm1.weight
    assert not torch.equal(ln, ln.half().float())  # layer norms stay fp32 (the tiny file is fp32)


def test_image_prompt_ids_literal(tiny2_model: OmniModel) -> None:
    lay = tiny2_model.layout
    L = 3
    p = build_prompt(Task.IMAGE_A1A2, lay, audio_features=torch.zeros(L, 64), image_features=torch.zeros(50, 32))
    assert p.ids.shape == (2, 8, L + 55) and p.audio_row == 0 and p.text_row == 1
    audio0 = [4101, *[4097] * 50, 4102, 4098, 4097, 4097, 4097, 4096, 4099]
    audio1 = [*audio0[:-1], 4097]
    for layer in range(7):
        shift = 152000 + layer * 4160
        assert p.ids[0, layer].tolist() == [a + shift for a in audio0]
        assert p.ids[1, layer].tolist() == [a + shift for a in audio1]
    for row in range(2):
        assert p.ids[row, 7].tolist() == [151937] * (L + 54) + [151939]
    vision, whisper = p.splices
    assert (vision.adapter, vision.start, vision.features.shape) == ("vision", 1, (2, 50, 32))
    assert (whisper.adapter, whisper.start, whisper.features.shape) == ("whisper", 52, (2, L, 64))


def test_image_task_tokens_equal_upstream_mini_omni2(tiny2_model: OmniModel, question_audio) -> None:
    prompt = tiny2_model.prompt(Task.IMAGE_A1A2, audio=question_audio, image=open_image_file(PICTURE))
    assert prompt.length == UPSTREAM["T"] == UPSTREAM["L"] + 55
    r = tiny2_model.start(prompt).run()
    assert [*r.audio_steps.tolist(), r.text_steps] == UPSTREAM["list_output"]
    assert r.stop == UPSTREAM["stop"]


def test_image_task_needs_both_inputs(tiny2_model: OmniModel, question_audio) -> None:
    with pytest.raises(InputError, match="needs an input image"):
        tiny2_model.prompt(Task.IMAGE_A1A2, audio=question_audio)


def _encoded(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_webp_decode(fmt: str) -> None:
    img = decode_image(_encoded(fmt))
    assert img.size == (64, 48)  # type: ignore[attr-defined]
    assert preprocess(img).shape == (3, 224, 224)


def test_rgba_and_greyscale_images_become_rgb() -> None:
    for mode in ("RGBA", "L", "P"):
        assert preprocess(decode_image(_encoded("PNG", mode=mode))).shape == (3, 224, 224)


@pytest.mark.parametrize(
    ("data", "kwargs", "match"),
    [
        (b"", {}, "empty"),
        (b"definitely not an image" * 10, {}, "not a PNG"),
        (_encoded("PNG")[:60], {}, "could not be decoded"),  # truncated
        (_encoded("GIF"), {}, "not a PNG"),  # a real image, but not a format we take
        (_encoded("PNG"), {"max_bytes": 10}, "limit is 10"),
        (_encoded("PNG", size=(4000, 3000)), {"max_pixels": 1_000_000}, "pixels"),
    ],
)
def test_bad_images_are_refused_with_a_reason(data: bytes, kwargs: dict, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        decode_image(data, **kwargs)


def _omnivox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "omnivox", *args], capture_output=True, text=True, timeout=300)


def test_generate_with_an_image(tiny2_ckpt: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "answer.json"
    wav = str(FIXTURES / "question.wav")
    r = _omnivox("generate", "--checkpoint-dir", str(tiny2_ckpt), "--input-wav", wav, "--input-image", str(PICTURE),
                 "--tokens-json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["task"] == "image-a1a2" and doc["num_steps"] == len(UPSTREAM["list_output"][0])
    # a Mini-Omni checkpoint refuses the image with a clear message
    r = _omnivox("generate", "--checkpoint-dir", str(tiny_ckpt), "--input-wav", wav, "--input-image", str(PICTURE))
    assert r.returncode == 2 and "takes no images" in r.stderr
    r = _omnivox("generate", "--checkpoint-dir", str(tiny2_ckpt), "--input-wav", wav, "--input-image",
                 str(FIXTURES / "question.wav"))  # fmt: skip
    assert r.returncode == 2 and "not a PNG" in r.stderr


def test_a_session_keeps_only_the_pixels_of_a_pending_image(tiny2_model: OmniModel, tiny_model: OmniModel, vad) -> None:
    from streaming.driver import LocalSession
    from streaming.events import SessionError
    from streaming.runner import ModelRunner

    session = LocalSession(ModelRunner(tiny2_model), vad, None)  # not started: add_image needs no runner thread
    big = _encoded("PNG", size=(3000, 2000))
    assert session.add_image(big) is not None and session.image_pending
    pending = session.session._pending_image
    assert isinstance(pending, torch.Tensor) and pending.shape == (3, 224, 224)
    assert session.add_image(b"not an image") is None
    errors = [e for e in session.poll() if isinstance(e, SessionError)]
    assert [e.code for e in errors] == ["invalid_image"]
    mini = LocalSession(ModelRunner(tiny_model), vad, None)
    assert mini.add_image(big) is None
    assert [e.code for e in mini.poll() if isinstance(e, SessionError)] == ["image_not_supported"]
