"""The Mini-Omni language model: transformers' Qwen2 backbone driven with averaged
8-stream embeddings, an output head over the padded vocabulary read in slices, and
the SwiGLU adapters that map encoder features into the embedding space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, Qwen2Config, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, apply_rotary_pos_emb

from .config import ModelConfig


class SwiGLUAdapter(nn.Module):
    """`proj(silu(fc_1 x) * fc_2 x)`, no bias (lit-gpt's whisperMLP / vision adapter)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.fc_2 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.proj = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


def qwen2_config(cfg: ModelConfig) -> Qwen2Config:
    config = Qwen2Config(  # type: ignore[call-arg]  # head_dim is a documented extra kwarg
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_query_groups,
        head_dim=cfg.head_size,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    config._attn_implementation = "sdpa"
    return config


@dataclass(frozen=True)
class Splice:
    """Encoder features that replace the 7 audio-stream embeddings at positions [start, start + len)."""

    start: int
    features: torch.Tensor  # (B, L, C_in) raw encoder features, adapted inside the model
    adapter: str = "whisper"


class OmniLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.layout = cfg.layout
        self.backbone = Qwen2Model(qwen2_config(cfg))  # backbone.embed_tokens is lit-gpt's wte
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embed_tokens.weight
        self.whisper_adapter = SwiGLUAdapter(cfg.whisper_adapter_dim, cfg.intermediate_size, cfg.n_embd)
        self.vision_adapter: SwiGLUAdapter | None = None
        if cfg.vision_adapter_dim is not None:
            self.vision_adapter = SwiGLUAdapter(cfg.vision_adapter_dim, cfg.intermediate_size, cfg.n_embd)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def cast_parameters_(self, dtype: torch.dtype) -> OmniLM:
        """Weights to `dtype`; buffers (RoPE's inverse frequencies) stay in fp32."""
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data.to(dtype)
        return self

    def embed(self, ids: torch.Tensor, splices: Sequence[Splice] = ()) -> torch.Tensor:
        """ids (B, 8, T) global ids -> (B, T, C), the mean of the 8 stream embeddings."""
        streams = self.backbone.embed_tokens(ids)  # (B, 8, T, C)
        n_audio = self.layout.num_audio_layers
        for splice in splices:
            adapter = self.whisper_adapter if splice.adapter == "whisper" else self.vision_adapter
            if adapter is None:
                raise ValueError(f"this checkpoint has no {splice.adapter} adapter")
            adapted = adapter(splice.features.to(device=streams.device, dtype=streams.dtype))  # (B, L, C)
            stop = splice.start + adapted.shape[1]
            streams[:, :n_audio, splice.start : stop] = adapted[:, None]
        # Sum the streams one by one, in stream order, as upstream does: bit-identical embeddings.
        x = streams[:, 0]
        for s in range(1, streams.shape[1]):
            x = x + streams[:, s]
        return x / streams.shape[1]

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.backbone.config)

    def hidden(self, embeds: torch.Tensor, cache: DynamicCache, start_pos: int) -> torch.Tensor:
        """embeds (B, T, C) at positions start_pos.. -> final-normed hidden states (B, T, C)."""
        T = embeds.shape[1]
        positions = torch.arange(start_pos, start_pos + T, device=embeds.device)[None]
        out = self.backbone(inputs_embeds=embeds, past_key_values=cache, position_ids=positions, use_cache=True)
        return out.last_hidden_state

    def hidden_step_batched(
        self, embeds: torch.Tensor, groups: Sequence[tuple[DynamicCache, int, slice]]
    ) -> torch.Tensor:
        """One decode position for several responses at once (continuous batching).

        embeds (N, 1, C) stacks the rows of every response; `groups` gives, per response, its
        own KV cache, its position and its rows. Every matmul runs once over all N rows; only
        attention runs per response, against that response's cache. Returns (N, C), the
        final-normed hidden states (the same math as `hidden`, in another grouping).
        """
        bb = self.backbone
        n = embeds.shape[0]
        positions = torch.cat([torch.full((sl.stop - sl.start,), pos, dtype=torch.long) for _, pos, sl in groups]).to(
            embeds.device
        )[:, None]  # (N, 1)
        cos, sin = bb.rotary_emb(embeds, positions)
        x = embeds
        layers = cast(list[Qwen2DecoderLayer], list(bb.layers))
        for layer_idx, layer in enumerate(layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            hd = attn.head_dim
            q = attn.q_proj(h).view(n, 1, -1, hd).transpose(1, 2)  # (N, H, 1, hd)
            k = attn.k_proj(h).view(n, 1, -1, hd).transpose(1, 2)  # (N, KV, 1, hd)
            v = attn.v_proj(h).view(n, 1, -1, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            outs = []
            for cache, _, rows in groups:
                keys, values = cache.update(k[rows], v[rows], layer_idx)
                outs.append(F.scaled_dot_product_attention(q[rows], keys, values, scale=attn.scaling, enable_gqa=True))
            o = torch.cat(outs).transpose(1, 2).reshape(n, 1, -1)  # (N, 1, H * hd)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return bb.norm(x)[:, -1]

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., C) -> (..., 152000) logits of the text slice only."""
        return F.linear(h, self.lm_head.weight[: self.layout.padded_text_vocab_size])

    def audio_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., C) -> (..., 7, 4160) logits of the 7 audio slices, local ids."""
        start, stop = self.layout.audio_logits_range
        logits = F.linear(h, self.lm_head.weight[start:stop])
        return logits.unflatten(-1, (self.layout.num_audio_layers, self.layout.padded_audio_vocab_size))

    def full_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)
