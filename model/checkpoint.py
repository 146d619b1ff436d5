"""Checkpoint I/O: the upstream Mini-Omni directory layout (DESIGN.md section 2),
lit-gpt <-> transformers key conversion, hub resolution and the loaded-model bundle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .audio import WhisperEncoder
from .codec import SnacCodec
from .config import ModelConfig
from .errors import CheckpointError
from .llm import OmniLM

log = logging.getLogger(__name__)

LIT_MODEL = "lit_model.pth"
MODEL_CONFIG = "model_config.yaml"
TOKENIZER = "tokenizer.json"
WHISPER_CANDIDATES = ("small.pt", "whisper/small.pt")
SNAC_DIR = "snac"

_LAYER_MAP = {  # lit-gpt block key -> our decoder-layer key (transformers' Qwen2 names; unfused parts)
    "norm_1.weight": "input_layernorm.weight",
    "norm_2.weight": "post_attention_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp.fc_1.weight": "mlp.gate_proj.weight",
    "mlp.fc_2.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "transformer.wte.weight": "backbone.embed_tokens.weight",
    "transformer.ln_f.weight": "backbone.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_ADAPTERS = ("whisper_adapter", "vision_adapter")


def split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lit-gpt's fused attn.attn weight (or bias), laid out per query group as
    [q_per_kv q-heads, 1 k-head, 1 v-head] x head_size, -> separate q, k, v."""
    g, q, hs = cfg.n_query_groups, cfg.q_per_kv, cfg.head_size
    rest = fused.shape[1:]
    grouped = fused.reshape(g, q + 2, hs, *rest)
    wq = grouped[:, :q].reshape(g * q * hs, *rest)
    wk = grouped[:, q].reshape(g * hs, *rest)
    wv = grouped[:, q + 1].reshape(g * hs, *rest)
    return wq, wk, wv


def fuse_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    g, q, hs = cfg.n_query_groups, cfg.q_per_kv, cfg.head_size
    rest = wq.shape[1:]
    parts = [wq.reshape(g, q, hs, *rest), wk.reshape(g, 1, hs, *rest), wv.reshape(g, 1, hs, *rest)]
    return torch.cat(parts, dim=1).reshape(g * (q + 2) * hs, *rest)


def litgpt_to_omni(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str = LIT_MODEL) -> dict[str, torch.Tensor]:
    """Upstream lit-gpt state dict -> OmniLM state dict. Missing keys raise CheckpointError."""

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"{source}: weight {key!r} is missing")
        return sd[key]

    out: dict[str, torch.Tensor] = {}
    for lit_key, key in _TOP_MAP.items():
        if lit_key == "lm_head.weight" and cfg.tie_word_embeddings and lit_key not in sd:
            continue
        out[key] = need(lit_key)
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["backbone.embed_tokens.weight"]
    for n in range(cfg.n_layer):
        src, dst = f"transformer.h.{n}.", f"backbone.layers.{n}."
        for lit_key, key in _LAYER_MAP.items():
            out[dst + key] = need(src + lit_key)
        wq, wk, wv = split_qkv(need(src + "attn.attn.weight"), cfg)
        (
            out[dst + "self_attn.q_proj.weight"],
            out[dst + "self_attn.k_proj.weight"],
            out[dst + "self_attn.v_proj.weight"],
        ) = wq, wk, wv
        if cfg.add_qkv_bias:
            bq, bk, bv = split_qkv(need(src + "attn.attn.bias"), cfg)
        else:  # our q/k/v always have biases: zeros are exactly "no bias"
            bq, bk, bv = (torch.zeros(w.shape[0], dtype=w.dtype) for w in (wq, wk, wv))
        out[dst + "self_attn.q_proj.bias"], out[dst + "self_attn.k_proj.bias"], out[dst + "self_attn.v_proj.bias"] = (
            bq,
            bk,
            bv,
        )
    for adapter in _ADAPTERS:
        if adapter == "vision_adapter" and cfg.vision_adapter_dim is None:
            continue
        for part in ("fc_1", "fc_2", "proj"):
            key = f"{adapter}.{part}.weight"
            out[key] = need(key)
    return out


def omni_to_litgpt(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """OmniLM state dict -> upstream lit-gpt layout (what `lit_model.pth` holds)."""
    out: dict[str, torch.Tensor] = {}
    for lit_key, key in _TOP_MAP.items():
        out[lit_key] = sd[key]
    for n in range(cfg.n_layer):
        src, dst = f"backbone.layers.{n}.", f"transformer.h.{n}."
        for lit_key, key in _LAYER_MAP.items():
            out[dst + lit_key] = sd[src + key]
        a = src + "self_attn."
        out[dst + "attn.attn.weight"] = fuse_qkv(
            sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"], cfg
        )
        if cfg.add_qkv_bias:
            out[dst + "attn.attn.bias"] = fuse_qkv(
                sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"], cfg
            )
    for key, value in sd.items():
        if key.split(".")[0] in _ADAPTERS:
            out[key] = value
    return {k: v.contiguous() for k, v in out.items()}


def build_llm(
    cfg: ModelConfig,
    omni_sd: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> OmniLM:
    """An OmniLM holding exactly these weights, built without a throw-away random init."""
    with torch.device("meta"):
        model = OmniLM(cfg)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in omni_sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{LIT_MODEL}: weights do not match {MODEL_CONFIG}: {e}") from None
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embed_tokens.weight
    return model.eval().requires_grad_(False)


def load_lit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable torch state dict: {e}") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # lightning fabric checkpoints wrap the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return sd


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


Downloader = Callable[..., str]


def resolve_checkpoint(spec: str | Path, downloader: Downloader | None = None) -> Path:
    """A local checkpoint directory, or a hub id (e.g. gpt-omni/mini-omni) fetched with
    huggingface_hub into its cache (offline: the cached copy, if any)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    spec = str(spec)
    if path.exists():
        raise CheckpointError(f"checkpoint {spec} is not a directory")
    if not looks_like_hub_id(spec):
        raise CheckpointError(f"checkpoint directory {spec} does not exist (and it is not a hub id like org/name)")
    if downloader is None:
        from huggingface_hub import snapshot_download

        downloader = snapshot_download
    log.info("resolving checkpoint %s from the Hugging Face hub", spec)
    try:
        return Path(downloader(repo_id=spec))
    except Exception as e:
        raise CheckpointError(f"checkpoint {spec}: not a local directory and the hub download failed: {e}") from None


def find_whisper_file(root: Path) -> Path | None:
    for rel in WHISPER_CANDIDATES:
        if (root / rel).is_file():
            return root / rel
    return None


def whisper_cache_file(name: str = "small") -> Path:
    """Where openai-whisper keeps its downloaded `name` model (Mini-Omni downloads it there)."""
    import whisper

    default = os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(os.getenv("XDG_CACHE_HOME", default)) / "whisper"
    url = whisper._MODELS[name]
    return root / os.path.basename(url)


def load_whisper(root: Path) -> WhisperEncoder:
    path = find_whisper_file(root)
    if path is None:
        cached = whisper_cache_file()
        if cached.is_file():
            path = cached
        else:
            import whisper

            log.info("no Whisper weights in %s; downloading openai-whisper 'small'", root)
            try:
                path = Path(whisper._download(whisper._MODELS["small"], str(cached.parent), False))
            except Exception as e:
                raise CheckpointError(
                    f"Whisper weights not found ({', '.join(str(root / c) for c in WHISPER_CANDIDATES)}, {cached}) "
                    f"and the download failed: {e}"
                ) from None
    return WhisperEncoder.from_file(path)


def load_snac(root: Path, noise: bool = False) -> SnacCodec:
    if (root / SNAC_DIR).is_dir():
        return SnacCodec.from_dir(root / SNAC_DIR, noise=noise)
    return SnacCodec.from_hub(noise=noise)
