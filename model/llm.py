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


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a bf16 scale per row (symmetric, 127 levels).

    Input columns whose weights are outliers (absmax > OUTLIER_RATIO x the median column's) are
    kept out of the int8 matrix and multiplied in bf16 (LLM.int8()'s decomposition, on the
    weight side): one large column would otherwise set every row's scale and flatten the
    rest. torch._weight_int8pack_mm is the CPU int8 weight-only kernel torchao and gpt-fast
    use; torchao itself ran 4x slower than bf16 here without torch.compile.
    """

    OUTLIER_RATIO = 4.0
    MAX_OUTLIER_FRACTION = 1 / 64
    DEQUANTIZE_ROWS = 48
    outlier_cols: torch.Tensor
    outlier_weight: torch.Tensor
    weight_int8: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float().clone()
        col_max = w.abs().amax(dim=0)
        ratio = col_max / col_max.median().clamp(min=1e-12)
        k = min(int((ratio > self.OUTLIER_RATIO).sum()), max(1, int(w.shape[1] * self.MAX_OUTLIER_FRACTION)))
        outliers = torch.topk(ratio, k).indices.sort().values if k else torch.zeros(0, dtype=torch.long)
        self.register_buffer("outlier_cols", outliers)
        self.register_buffer("outlier_weight", w[:, outliers].to(torch.bfloat16))
        w[:, outliers] = 0
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias: nn.Parameter | None = None
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if flat.shape[0] >= self.DEQUANTIZE_ROWS:
            # The int8 kernel costs ~linear time per row (a GEMV each); for a prefill's many
            # rows a bf16 GEMM on the weights dequantized for this call is ~2x faster.
            y = F.linear(flat, self.weight_int8.to(torch.bfloat16) * self.scales[:, None])
        else:
            y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        if self.outlier_cols.numel():
            y = y + flat[:, self.outlier_cols] @ self.outlier_weight.T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class Int8Head(nn.Module):
    """The output head in int8 mode: the text slice and the 7 audio slices as two Int8Linear
    layers (a step reads only the slices it needs); calling it gives the whole padded vocab."""

    def __init__(self, weight: torch.Tensor, text_rows: int) -> None:
        super().__init__()
        self.text = Int8Linear(weight[:text_rows], None)
        self.audio = Int8Linear(weight[text_rows:], None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.text(h), self.audio(h)], dim=-1)


class OmniLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.layout = cfg.layout
        self.backbone = Qwen2Model(qwen2_config(cfg))  # backbone.embed_tokens is lit-gpt's wte
        self.lm_head: nn.Linear | Int8Head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embed_tokens.weight
        self.whisper_adapter = SwiGLUAdapter(cfg.whisper_adapter_dim, cfg.intermediate_size, cfg.n_embd)
        self.vision_adapter: SwiGLUAdapter | None = None
        if cfg.vision_adapter_dim is not None:
            self.vision_adapter = SwiGLUAdapter(cfg.vision_adapter_dim, cfg.intermediate_size, cfg.n_embd)

    @property
    def device(self) -> torch.device:
        return self.backbone.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embed_tokens.weight.dtype

    def cast_parameters_(self, dtype: torch.dtype) -> OmniLM:
        """Weights to `dtype`; buffers (RoPE's inverse frequencies) stay in fp32."""
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data.to(dtype)
        return self

    @property
    def is_int8(self) -> bool:
        return isinstance(self.lm_head, Int8Head)

    def quantize_int8_(self) -> OmniLM:
        """Approximate mode: int8 weights (one scale per output channel) in every Linear of the
        decoder layers and in the head's text and audio slices, bf16 activations, matmuls by
        torch's int8 weight-only kernel. A decode step reads half the bytes of bf16, and on this
        memory-bound CPU that is ~2x the steps/s (README, Precision). Embeddings, norms and
        the adapters stay in bf16/fp32; call on the fp32 model (scales come from fp32 weights).
        """
        if self.dtype != torch.float32 or isinstance(self.lm_head, Int8Head):
            raise ValueError("quantize_int8_ needs the fp32 model")
        # The int8 head replaces the fp32 one (unless tied, its weights are then freed).
        self.lm_head = Int8Head(self.lm_head.weight, self.layout.padded_text_vocab_size)
        for layer in cast(list[Qwen2DecoderLayer], list(self.backbone.layers)):
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, Int8Linear(child.weight, child.bias))
        self.cast_parameters_(torch.bfloat16)
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
        head = self.lm_head
        if isinstance(head, Int8Head):
            return head.text(h)
        return F.linear(h, head.weight[: self.layout.padded_text_vocab_size])

    def audio_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., C) -> (..., 7, 4160) logits of the 7 audio slices, local ids."""
        start, stop = self.layout.audio_logits_range
        head = self.lm_head
        logits = head.audio(h) if isinstance(head, Int8Head) else F.linear(h, head.weight[start:stop])
        return logits.unflatten(-1, (self.layout.num_audio_layers, self.layout.padded_audio_vocab_size))

    def full_logits(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm_head(h))
