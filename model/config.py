"""ModelConfig: the frozen, typed view of an upstream lit-gpt `model_config.yaml`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import CheckpointError
from .layout import TokenLayout

# Weight precision modes of OmniModel.load (model.omni.resolve_precision says what each does).
PRECISIONS = ("auto", "float32", "bfloat16", "int8", "int4")
QUANTIZED_PRECISIONS = ("int8", "int4")  # CPU only: quantized weights, bf16 activations
# What the Whisper encoder sees per turn (OmniModel.load's whisper_window). "padded" (default,
# exact): the 30 s window upstream encodes. "trimmed" (opt-in, approximate): only the turn's
# length, a fraction of the work, but attention is global so the features differ (model.audio).
WHISPER_WINDOWS = ("padded", "trimmed")

# lit-gpt keys whose values must be exactly these for the Mini-Omni architecture we run.
_REQUIRED_LITGPT_VALUES: dict[str, Any] = {
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "LLaMAMLP",
    "parallel_residual": False,
    "shared_attention_norm": False,
    "rotary_percentage": 1.0,
    "scale_embeddings": False,
    "post_adapter": False,
    "bias": False,
    "lm_head_bias": False,
    "n_expert": 0,
    "rope_condense_ratio": 1,
}


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mini-omni"
    block_size: int = 2048
    n_layer: int = 24
    n_head: int = 14
    n_query_groups: int = 2
    head_size: int = 64
    n_embd: int = 896
    intermediate_size: int = 4864
    norm_eps: float = 1e-6
    rope_base: float = 1_000_000.0
    padded_vocab_size: int = 181120
    text_vocab_size: int = 152000  # padded text part (tokenizer ids + text specials)
    audio_vocab_size: int = 4160  # padded size of one audio layer
    whisper_adapter_dim: int = 768
    add_qkv_bias: bool = True
    tie_word_embeddings: bool = False
    vision_adapter_dim: int | None = None  # set for Mini-Omni2 checkpoints

    def __post_init__(self) -> None:
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_query_groups {self.n_query_groups}")
        expected = self.text_vocab_size + 7 * self.audio_vocab_size
        if self.padded_vocab_size != expected:
            raise ValueError(
                f"padded_vocab_size {self.padded_vocab_size} != text_vocab_size + 7 * audio_vocab_size = {expected}"
            )

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(
            padded_text_vocab_size=self.text_vocab_size,
            padded_audio_vocab_size=self.audio_vocab_size,
            text_special_base=self.text_vocab_size - 64,
        )

    @property
    def q_per_kv(self) -> int:
        return self.n_head // self.n_query_groups

    # ---- lit-gpt yaml ----
    @classmethod
    def from_litgpt_dict(cls, raw: dict[str, Any], source: str = "model_config.yaml") -> ModelConfig:
        for key, want in _REQUIRED_LITGPT_VALUES.items():
            if key in raw and raw[key] != want:
                raise CheckpointError(f"{source}: {key}={raw[key]!r} is not supported (Mini-Omni uses {want!r})")
        try:
            n_embd = int(raw["n_embd"])
            n_head = int(raw["n_head"])
            kwargs: dict[str, Any] = dict(
                name=str(raw.get("name") or "mini-omni"),
                block_size=int(raw["block_size"]),
                n_layer=int(raw["n_layer"]),
                n_head=n_head,
                n_query_groups=int(raw.get("n_query_groups") or n_head),
                head_size=int(raw.get("head_size") or n_embd // n_head),
                n_embd=n_embd,
                intermediate_size=int(raw["intermediate_size"]),
                norm_eps=float(raw.get("norm_eps", 1e-5)),
                rope_base=float(raw.get("rope_base", 10000)),
                padded_vocab_size=int(raw["padded_vocab_size"]),
                text_vocab_size=int(raw.get("text_vocab_size", 152000)),
                audio_vocab_size=int(raw.get("audio_vocab_size", 4160)),
                whisper_adapter_dim=int(raw.get("whisper_adapter_dim", 768)),
                add_qkv_bias=bool(raw.get("add_qkv_bias", raw.get("bias", True))),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            )
            if raw.get("vision_adapter_dim") is not None:
                kwargs["vision_adapter_dim"] = int(raw["vision_adapter_dim"])
            return cls(**kwargs)
        except KeyError as e:
            raise CheckpointError(f"{source}: required key {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: Path) -> ModelConfig:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} does not hold a mapping of lit-gpt config keys")
        return cls.from_litgpt_dict(raw, source=str(path))

    def to_litgpt_dict(self) -> dict[str, Any]:
        """The lit-gpt Config keys upstream's `Config.from_file` accepts."""
        d: dict[str, Any] = {
            "name": self.name,
            "hf_config": {"org": "Qwen", "name": "Qwen2-0.5B"},
            "block_size": self.block_size,
            "vocab_size": 151936,
            "padding_multiple": 512,
            "padded_vocab_size": self.padded_vocab_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_query_groups": self.n_query_groups,
            "head_size": self.head_size,
            "n_embd": self.n_embd,
            "intermediate_size": self.intermediate_size,
            "norm_eps": self.norm_eps,
            "rope_base": int(self.rope_base) if float(self.rope_base).is_integer() else self.rope_base,
            "add_qkv_bias": self.add_qkv_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_vocab_size": self.text_vocab_size,
            "cat_audio_vocab_size": 7 * self.audio_vocab_size,
            "audio_vocab_size": self.audio_vocab_size,
            "whisper_adapter_dim": self.whisper_adapter_dim,
            "asr_adapter": "llamamlp",
            "post_adapter_layers": 6,
            "gelu_approximate": "none",
            "pos_type": "rope",
            "attn_dropout": 0.0,
            "n_expert_per_token": 0,
            "force_align": False,
            "use_pretrain_phoneme_emb": False,
            "prompt_vocab_size": None,
        }
        d.update(_REQUIRED_LITGPT_VALUES)
        if self.vision_adapter_dim is not None:
            d["vision_adapter_dim"] = self.vision_adapter_dim
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ModelConfig(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL_CONFIG = ModelConfig()
TINY_CONFIG = ModelConfig(
    name="mini-omni-tiny",
    n_layer=2,
    n_head=4,
    n_query_groups=2,
    head_size=16,
    n_embd=64,
    intermediate_size=128,
    whisper_adapter_dim=64,
)
