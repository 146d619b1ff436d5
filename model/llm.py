"""The Mini-Omni language model: a Qwen2 decoder (our own block forward over the checkpoint's
weights) driven with averaged 8-stream embeddings, an output head over the padded vocabulary
read in slices, and the SwiGLU adapters that map encoder features into the embedding space.

One forward, `OmniLM.hidden_batched`, serves the prefill, a single response's decode step and
the batched decode of several responses (continuous batching): the rows of all responses are
stacked, every matmul runs once over all of them, and attention runs per response against its
own `KVCache` at its own positions.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

if TYPE_CHECKING:
    from .decode_graph import DecodeGraph


class SwiGLUAdapter(nn.Module):
    """`proj(silu(fc_1 x) * fc_2 x)`, no bias (lit-gpt's whisperMLP / vision adapter)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.fc_2 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.proj = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


def adapt(adapter: SwiGLUAdapter, features: torch.Tensor) -> torch.Tensor:
    """features (B, L, C_in) -> (B, L, C) in the adapter's own dtype. Rows that are one
    tensor expanded (a prompt's audio and text rows hear the same turn) are adapted once."""
    dtype = adapter.fc_1.weight.dtype
    if features.shape[0] > 1 and features.stride(0) == 0:
        return adapter(features[:1].to(dtype)).expand(features.shape[0], -1, -1)
    return adapter(features.to(dtype))


class KVCache:
    """One response's keys and values for every layer: k, v (n_layer, B, KV, capacity, hs).

    A forward writes positions [start, start + T) in place and attends to [0, start + T);
    `length`, the valid prefix, advances only after the whole forward succeeded. So a forward
    that raised leaves the cache as it was (its half-written slots lie past `length`, and a
    retry at the same start overwrites them), and `start <= length` lets a step be redone
    after its forward succeeded but the step failed later (in sampling, say).
    """

    GROW = 256  # capacity grows in multiples of this (a copy of the valid prefix each time)

    def __init__(self, n_layer: int, n_kv_heads: int, head_size: int, max_len: int) -> None:
        self.n_layer, self.n_kv_heads, self.head_size, self.max_len = n_layer, n_kv_heads, head_size, max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        # Set when k, v are rows of a KVArena's buffers: then the arena grows them.
        self.arena: KVArena | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[3]

    def reserve(self, start: int, stop: int, like: torch.Tensor) -> None:
        """Room for positions [start, stop) of `like`'s rows, dtype and device. Raises before
        changing anything when the write would leave a hole or pass the window."""
        if not 0 <= start <= self.length:
            raise ValueError(f"KV write at position {start}: only {self.length} positions are valid")
        if stop > self.max_len:
            raise ValueError(f"position {stop - 1} is past the model's {self.max_len}-token window")
        rows = like.shape[0]
        if self.k is not None and (self.k.shape[1], self.k.dtype, self.k.device) != (rows, like.dtype, like.device):
            raise ValueError("a KV cache serves one response: same rows, dtype and device at every step")
        if stop <= self.capacity:
            return
        if self.arena is not None:
            self.arena.grow(stop)
            return
        cap = grown_capacity(self.capacity, stop, self.max_len)
        k = like.new_empty((self.n_layer, rows, self.n_kv_heads, cap, self.head_size))
        v = torch.empty_like(k)
        if self.k is not None and self.v is not None:
            k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
            v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        self.k, self.v = k, v

    def repeat_rows(self, rows: int) -> KVCache:
        """A new cache whose `rows` rows each hold this one-row cache's valid positions."""
        if self.k is None or self.v is None or self.k.shape[1] != 1:
            raise ValueError("repeat_rows copies a filled one-row cache")
        out = KVCache(self.n_layer, self.n_kv_heads, self.head_size, self.max_len)
        out.k, out.v = self.k.repeat(1, rows, 1, 1, 1), self.v.repeat(1, rows, 1, 1, 1)
        out.length = self.length
        return out

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, KV, T, hs) at [start, start + T) of `layer` -> its keys, values for [0, start + T)."""
        assert self.k is not None and self.v is not None, "reserve() first"
        stop = start + k.shape[2]
        self.k[layer, :, :, start:stop] = k
        self.v[layer, :, :, start:stop] = v
        return self.k[layer, :, :, :stop], self.v[layer, :, :, :stop]


def grown_capacity(capacity: int, stop: int, max_len: int) -> int:
    """Room for position stop - 1: at least twice the old capacity (few copies), in multiples of
    KVCache.GROW, never past the window."""
    return min(max_len, max(2 * capacity, -(-stop // KVCache.GROW) * KVCache.GROW))


class KVArena:
    """One k and one v buffer (n_layer, R, KV, capacity, hs) for the caches of responses that
    decode together, each member cache's k, v a view of its own rows. Why: a decode graph call
    takes one buffer per layer (GroupQueryAttention), so only caches that share buffers can be
    stepped by one call (model.decode_graph), which costs far less than a call each.

    A cache joins with `admit`, its valid prefix copied in; members keep their row order. A
    member whose response ended (the cache was freed) leaves rows that the next `admit` gives
    back, moving the later members down; once no member is left the buffers are freed."""

    def __init__(self, n_layer: int, n_kv_heads: int, head_size: int, max_len: int) -> None:
        self.n_layer, self.n_kv_heads, self.head_size, self.max_len = n_layer, n_kv_heads, head_size, max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self._members: list[tuple[weakref.ref[KVCache], int]] = []  # (cache, its rows) in row order

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[3]

    def members(self) -> list[tuple[KVCache | None, slice]]:
        """Each member (None once freed) and its rows, in row order."""
        out, row = [], 0
        for ref, rows in self._members:
            out.append((ref(), slice(row, row + rows)))
            row += rows
        return out

    def release_freed(self) -> None:
        """Free the buffers once every member was freed (cheap: call it at every step)."""
        if self._members and all(ref() is None for ref, _ in self._members):
            self._members, self.k, self.v = [], None, None

    def admit(self, caches: Sequence[KVCache], stop: int) -> None:
        """Make every one of `caches` (filled, of the members' dtype and device) a member, and
        give every member room for positions up to `stop` - 1 and past its own valid prefix.
        Copies only when the membership or the buffers' size change."""
        live = [(c, rows) for ref, rows in self._members if (c := ref()) is not None]
        new: list[tuple[KVCache, int]] = []
        for cache in caches:
            if cache.arena is self:
                continue
            if cache.arena is not None or cache.k is None or cache.v is None:
                raise ValueError("the arena admits a filled cache that no other arena holds")
            if self.k is not None and (cache.k.dtype, cache.k.device) != (self.k.dtype, self.k.device):
                raise ValueError("the arena's caches share one dtype and device")
            new.append((cache, cache.k.shape[1]))
        if not live and not new:
            self._members, self.k, self.v = [], None, None
            return
        # Room past each valid prefix too: a member that does not step rides along (decode_graph).
        need = max([stop] + [min(c.length + 1, self.max_len) for c, _ in live + new])
        rows_used, rows_new = sum(rows for _, rows in self._members), sum(rows for _, rows in new)
        if (
            self.k is not None
            and len(live) == len(self._members)
            and need <= self.capacity
            and rows_used + rows_new <= self.k.shape[1]
        ):  # no hole, room at the end: copy in the new ones only
            self._place(new, rows_used)
            return
        like = (live + new)[0][0].k
        assert like is not None
        capacity = grown_capacity(self.capacity, need, self.max_len) if need > self.capacity else self.capacity
        shape = (self.n_layer, sum(r for _, r in live + new), self.n_kv_heads, capacity, self.head_size)
        self.k, self.v = like.new_empty(shape), like.new_empty(shape)  # members still view the old
        self._members = []
        self._place(live + new, 0)

    def grow(self, stop: int) -> None:
        """Room for position stop - 1 in every member (a member's KVCache.reserve asks)."""
        if stop > self.capacity:
            self.admit([], stop)

    def _place(self, caches: Sequence[tuple[KVCache, int]], row: int) -> None:
        """Copy each cache's valid prefix to the rows from `row` on and make it a view of them."""
        assert self.k is not None and self.v is not None
        for cache, rows in caches:
            assert cache.k is not None and cache.v is not None
            k, v = self.k[:, row : row + rows], self.v[:, row : row + rows]
            k[:, :, :, : cache.length] = cache.k[:, :, :, : cache.length]
            v[:, :, :, : cache.length] = cache.v[:, :, :, : cache.length]
            cache.k, cache.v, cache.arena = k, v, self
            self._members.append((weakref.ref(cache), rows))
            row += rows


class CacheRows(NamedTuple):
    """One response in a forward: its cache, the position of its first new token, its rows."""

    cache: KVCache
    start: int
    rows: slice


@dataclass(frozen=True)
class _Attend:
    rows: CacheRows
    mask: torch.Tensor | None  # (T, start + T) bool, only for T > 1 after a prefix
    causal: bool


def rope_tables(positions: torch.Tensor, head_size: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """positions (N, T) -> cos, sin (N, 1, T, hs): rotate-half RoPE over the whole head, angles in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float, device=positions.device) / head_size))
    angles = positions[..., None].float() * inv_freq  # (N, T, hs / 2)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in fp32, the scale applied in the input's dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention; q/k/v always carry a bias (zeros where the checkpoint has none)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hs, c = cfg.head_size, cfg.n_embd
        self.head_size = hs
        self.q_proj = nn.Linear(c, cfg.n_head * hs, bias=True)
        self.k_proj = nn.Linear(c, cfg.n_query_groups * hs, bias=True)
        self.v_proj = nn.Linear(c, cfg.n_query_groups * hs, bias=True)
        self.o_proj = nn.Linear(cfg.n_head * hs, c, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, plan: Sequence[_Attend]
    ) -> torch.Tensor:
        n, t, _ = x.shape
        hs = self.head_size
        q = apply_rope(self.q_proj(x).view(n, t, -1, hs).transpose(1, 2), cos, sin)  # (N, H, T, hs)
        k = apply_rope(self.k_proj(x).view(n, t, -1, hs).transpose(1, 2), cos, sin)  # (N, KV, T, hs)
        v = self.v_proj(x).view(n, t, -1, hs).transpose(1, 2)  # (N, KV, T, hs)
        outs = []
        for a in plan:  # each response against its own cache
            cache, start, rows = a.rows
            keys, values = cache.write(layer, start, k[rows], v[rows])  # (B, KV, start + T, hs)
            qr = q[rows]
            if t == 1:
                # One position: the q-heads of a group become queries of their KV head (no mask
                # needed); on CPU several times faster than SDPA's enable_gqa at bf16.
                b, kv = qr.shape[0], keys.shape[1]
                o = F.scaled_dot_product_attention(qr.reshape(b, kv, -1, hs), keys, values).reshape(b, -1, 1, hs)
            else:
                o = F.scaled_dot_product_attention(
                    qr, keys, values, attn_mask=a.mask, is_causal=a.causal, enable_gqa=True
                )
            outs.append(o)
        o = outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, H, T, hs)
        return cast(torch.Tensor, self.o_proj(o.transpose(1, 2).reshape(n, t, -1)))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x) (lit-gpt's LLaMAMLP fc_1, fc_2, proj)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    """`x += attn(norm_1 x)`, then `x += mlp(norm_2 x)`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, plan: Sequence[_Attend]
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The Qwen2 decoder stack. Parameter names are transformers' Qwen2Model's, so state-dict
    keys (model.checkpoint's lit-gpt conversion) stay what they were."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)

    def decoder_layers(self) -> list[DecoderLayer]:
        return cast(list[DecoderLayer], list(self.layers))


@dataclass(frozen=True)
class Splice:
    """Encoder features that replace the 7 audio-stream embeddings at positions [start, start + len)."""

    start: int
    features: torch.Tensor  # (B, L, C_in) raw encoder features, adapted inside the model
    adapter: str = "whisper"


def _split_outlier_columns(w: torch.Tensor, ratio: float, max_fraction: float) -> torch.Tensor:
    """Indices (sorted) of the input columns whose absmax is > `ratio` x the median column's, at
    most `max_fraction` of them: the columns a quantized layer keeps out of its low-bit matrix."""
    col_max = w.abs().amax(dim=0)
    rel = col_max / col_max.median().clamp(min=1e-12)
    k = min(int((rel > ratio).sum()), max(1, int(w.shape[1] * max_fraction)))
    return torch.topk(rel, k).indices.sort().values if k else torch.zeros(0, dtype=torch.long)


# How a quantized Linear computes a prefill's many rows (>= QuantLinear.DEQUANTIZE_ROWS): the
# weights dequantized for one GEMM in bf16 or in fp32, or the weight-only kernel on every row.
# Which is fastest is the host's, not its flags' (model.probe.probe_many_rows: on a 2-core AVX2
# EPYC a bf16 GEMM ran at a fifth of fp32's speed, on an AVX-512 one at twice it).
MANY_ROWS_MODES = ("gemm-bf16", "gemm-fp32", "kernel")


class QuantLinear(nn.Module):
    """y = x W^T + b with W in a low-bit form (subclasses), bf16 activations.

    Input columns whose weights are outliers (absmax > OUTLIER_RATIO x the median column's) are
    kept out of the quantized matrix and multiplied in bf16 (LLM.int8()'s decomposition, on the
    weight side): one large column would otherwise set every row's (or group's) scale and
    flatten the rest. For a prefill's many rows (>= DEQUANTIZE_ROWS) `many_rows` says how:
    the weight-only kernels cost ~linear time per row (GEMVs), so where a GEMM is fast the
    weights are dequantized for one ("gemm-bf16", or "gemm-fp32" on the unrounded input).
    """

    OUTLIER_RATIO = 4.0
    MAX_OUTLIER_FRACTION = 1 / 64
    DEQUANTIZE_ROWS = 48
    DEQUANTIZE_BLOCK = 512
    many_rows = "gemm-bf16"  # one of MANY_ROWS_MODES
    outlier_cols: torch.Tensor
    outlier_weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float().clone()
        outliers = _split_outlier_columns(w, self.OUTLIER_RATIO, self.MAX_OUTLIER_FRACTION)
        self.register_buffer("outlier_cols", outliers)
        self.register_buffer("outlier_weight", w[:, outliers].to(torch.bfloat16))
        w[:, outliers] = 0
        self.out_features, self.in_features = w.shape
        self._quantize(w)
        self.bias: nn.Parameter | None = None
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _quantize(self, w: torch.Tensor) -> None:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in) bf16, few rows -> (rows, out) by the weight-only kernel."""
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype = torch.bfloat16, rows: slice = slice(None)) -> torch.Tensor:
        """The quantized matrix (or its output `rows`) as (out, in) in `dtype`, outlier columns zero."""
        raise NotImplementedError

    def _dequantized_matmul(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x (rows, in) @ the dequantized matrix.T, DEQUANTIZE_BLOCK output rows at a time: each
        block is still in cache for its GEMM, where the whole matrix went out to memory and back
        (a 4864 x 896 matrix at 103 rows, fp32: 28 -> 19 ms on the 2-core AVX2 EPYC). Each
        output column sums the same products; a block's GEMM may round them differently."""
        step = self.DEQUANTIZE_BLOCK
        x = x.to(dtype)
        blocks = [F.linear(x, self.dequantized(dtype, slice(a, a + step))) for a in range(0, self.out_features, step)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        low = flat.to(torch.bfloat16)
        if self.many_rows != "kernel" and flat.shape[0] >= self.DEQUANTIZE_ROWS:
            if self.many_rows == "gemm-fp32":
                y = self._dequantized_matmul(flat, torch.float32)
            else:
                y = self._dequantized_matmul(low, torch.bfloat16)
        else:
            y = self._matmul(low.contiguous())
        if self.outlier_cols.numel():
            y = y + low[:, self.outlier_cols] @ self.outlier_weight.T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class Int8Linear(QuantLinear):
    """int8 rows times a bf16 scale per row (symmetric, 127 levels), by torch's CPU int8
    weight-only kernel (torch._weight_int8pack_mm, what torchao and gpt-fast use; torchao
    itself ran 4x slower than bf16 here without torch.compile)."""

    weight_int8: torch.Tensor
    scales: torch.Tensor

    def _quantize(self, w: torch.Tensor) -> None:
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight_int8, self.scales)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16, rows: slice = slice(None)) -> torch.Tensor:
        return self.weight_int8[rows].to(dtype) * self.scales[rows].to(dtype)[:, None]


class Int4Linear(QuantLinear):
    """4-bit weights, asymmetric per group of GROUP inputs: w = (u - zero) * scale with u and
    the zero point integers in 0..15 and the scale a bf16 value (held in fp32). That is the
    form ONNX Runtime's MatMulNBits takes at full speed (uint8 zero points; float offsets take
    a slow path, 40x here), so the decode graph steps these same weights (model.decode_graph).

    Few rows (a decode step without the graph, a short prefill) go through torch's CPU int4
    kernel (torch._weight_int4pack_mm_for_cpu, gpt-fast's), whose form is (u - 8) * scale +
    offset in bf16: offset = (8 - zero) * scale rounded to bf16, a rounding of the weights
    below 2^-9 of a group's offset. A prefill's many rows take that kernel too (`many_rows`
    "kernel"): on the 2-core AVX2 EPYC it ran 96 rows of a 4864 x 896 matrix in 28.9 ms
    against 30.6 for the exact dequantized fp32 GEMM (`dequantized`); dequantized a block of rows
    at a time, a whole 103-position prefill took 2831 ms against the kernel's 3001, within
    that host's noise."""

    GROUP = 32
    REFITS = 3
    many_rows = "kernel"
    weight_u4: torch.Tensor  # (out, in / 2) uint8: two weights a byte, the even input in the low nibble
    zeros: torch.Tensor  # (out, in / GROUP) uint8 in 0..15
    group_scales: torch.Tensor  # (out, in / GROUP) fp32, bf16 values
    weight_int4: torch.Tensor  # torch's packed layout of the same u, for its kernel
    scales_zeros: torch.Tensor  # (in / GROUP, out, 2) bf16: torch's (scale, offset)

    def _quantize(self, w: torch.Tensor) -> None:
        n, k = w.shape
        if k % self.GROUP or n % 16:
            raise ValueError(f"int4 needs in % {self.GROUP} == 0 and out % 16 == 0, got ({n}, {k})")
        groups = w.reshape(n, k // self.GROUP, self.GROUP)
        # The range holds 0, so the zero point falls on the 0..15 grid.
        lo, hi = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        zero = torch.round(-lo / scale).clamp(0, 15)[..., None]
        u = torch.round(groups / scale[..., None] + zero).clamp(0, 15)
        # An integer zero point moves the grid off the range by up to half a step; refitting
        # the scale to the rounded weights (least squares) and rounding again wins that back:
        # 8.1% -> 7.8% error on normal weights, what float offsets gave (README, Precision).
        for _ in range(self.REFITS):
            q = u - zero
            scale = ((groups * q).sum(-1) / (q * q).sum(-1).clamp(min=1e-12)).clamp(min=1e-12)
            scale = scale.to(torch.bfloat16).float()
            u = torch.round(groups / scale[..., None] + zero).clamp(0, 15)
        zero, u = zero[..., 0], u.to(torch.uint8).reshape(n, k)
        self.register_buffer("weight_u4", u[:, 0::2] | (u[:, 1::2] << 4))
        self.register_buffer("zeros", zero.to(torch.uint8))
        self.register_buffer("group_scales", scale)
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 1))
        sz = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.register_buffer("scales_zeros", sz)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.weight_int4, self.GROUP, self.scales_zeros)

    def unpacked(self, rows: slice = slice(None)) -> torch.Tensor:
        """u (of the output `rows`) as (out, in) uint8."""
        packed = self.weight_u4[rows]
        return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16, rows: slice = slice(None)) -> torch.Tensor:
        u = self.unpacked(rows)
        n, k = u.shape
        u = u.reshape(n, k // self.GROUP, self.GROUP).float()
        w = (u - self.zeros[rows].float()[..., None]) * self.group_scales[rows].float()[..., None]  # exact in fp32
        return w.reshape(n, k).to(dtype)


class OrtInt8Linear(QuantLinear):
    """int8 weights with a scale per BLOCK inputs, by ONNX Runtime's MatMulNBits (8 bits,
    accuracy level 4: activations quantized to int8 per block, VNNI dot products). For the
    head's 152000-row text slice, the one matrix a decode step reads that is larger than a
    layer: torch's int8 kernel read it at 9 GB/s, this one at 23 (6.6 vs 15.0 ms at 2 rows,
    README, Weight-only kernels). The layers stay with torch: as one session per matmul ORT
    gained little there (24 layers: 30.9 vs 36.3 ms) for 168 sessions; its gain needs the
    whole step as one graph."""

    BLOCK = 32
    many_rows = "kernel"

    def _quantize(self, w: torch.Tensor) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        n, k = w.shape
        if k % self.BLOCK:
            raise ValueError(f"MatMulNBits needs in % {self.BLOCK} == 0, got ({n}, {k})")
        blocks = w.reshape(n, k // self.BLOCK, self.BLOCK)
        scales = blocks.abs().amax(dim=-1).clamp(min=1e-12) / 127
        # MatMulNBits' layout: B (N, K / block, block) uint8 around the default zero point 128.
        q = (torch.round(blocks / scales[..., None]).clamp(-127, 127) + 128).to(torch.uint8)
        node = helper.make_node(
            "MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
            K=k, N=n, bits=8, block_size=self.BLOCK, accuracy_level=4,
        )  # fmt: skip
        graph = helper.make_graph(
            [node],
            "linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
            initializer=[
                numpy_helper.from_array(q.numpy(), "B"),
                numpy_helper.from_array(scales.reshape(-1).numpy(), "scales"),
            ],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # Its pool sleeps between calls instead of spinning against torch's threads.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        (y,) = self._session.run(None, {"x": x.float().numpy()})
        return torch.from_numpy(y)


QUANTIZED = {"int8": Int8Linear, "int4": Int4Linear}  # precision -> the MLPs' layer kind


class QuantHead(nn.Module):
    """The output head in a quantized mode: the text slice (OrtInt8Linear) and the 7 audio
    slices (Int8Linear) as two quantized layers (a step reads only the slices it needs);
    calling it gives the whole padded vocab."""

    def __init__(self, weight: torch.Tensor, text_rows: int) -> None:
        super().__init__()
        self.text = OrtInt8Linear(weight[:text_rows], None)
        self.audio = Int8Linear(weight[text_rows:], None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.text(h), self.audio(h)], dim=-1)


class OmniLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.layout = cfg.layout
        self.backbone = Backbone(cfg)  # backbone.embed_tokens is lit-gpt's wte
        self.lm_head: nn.Linear | QuantHead = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.quantized: str | None = None  # "int8" | "int4" once quantize_ has run
        # int8 on a CPU: the decode step as one ONNX Runtime graph (model.decode_graph); with it
        # set, activations and KV caches are fp32 (its attention's dtype).
        self.decode_graph: DecodeGraph | None = None
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

    def cast_parameters_(self, dtype: torch.dtype, adapter_dtype: torch.dtype | None = None) -> OmniLM:
        """Weights to `dtype`, the adapters' to `adapter_dtype` (default `dtype`), each from the
        weights as they are (never through another rounding); buffers (int8 weights and
        scales) keep theirs. RoPE has no buffer: its angles are computed in fp32 at every forward."""
        adapters = {id(p) for a in (self.whisper_adapter, self.vision_adapter) if a is not None for p in a.parameters()}
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data.to(adapter_dtype if adapter_dtype is not None and id(p) in adapters else dtype)
        return self

    def quantize_(
        self, precision: str = "int8", many_rows: str | None = None, adapter_dtype: torch.dtype = torch.bfloat16
    ) -> OmniLM:
        """Approximate modes: weight-only quantized matmuls with bf16 activations.
        int8: every Linear of the decoder layers and the head's audio slices hold int8 weights,
        one scale per output row, by torch's kernel; the head's text slice has a scale per 32
        inputs, by ONNX Runtime's (OrtInt8Linear). A decode step reads half the bytes of
        bf16, and on this memory-bound CPU that is ~2x the steps/s. int4: the MLPs' Linears (88% of the
        layers' weights) hold 4-bit weights in groups of 32 inputs; attention and the head stay
        int8: 4-bit attention or head weights cost most of the agreement for a little speed
        (README, Precision). Embeddings and norms go to bf16, the adapters to `adapter_dtype`; call on the
        fp32 model (scales come from fp32 weights). many_rows: how the int8 Linears compute a
        prefill (MANY_ROWS_MODES; model.probe.probe_many_rows times them), else their default.
        adapter_dtype: the adapters' weights, bf16 or fp32: they map a prompt's ~100 feature
        rows, many-row work like the encoders', so they take the dtype the probe timed faster
        for those (a bf16 GEMM is 5x slower than fp32 on a host without native bf16).
        """
        if adapter_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"adapter_dtype must be bfloat16 or float32, got {adapter_dtype}")
        if precision not in QUANTIZED:
            raise ValueError(f"quantize_ takes {', '.join(QUANTIZED)}, got {precision!r}")
        if many_rows is not None and many_rows not in MANY_ROWS_MODES:
            raise ValueError(f"many_rows must be one of {', '.join(MANY_ROWS_MODES)}, got {many_rows!r}")
        if self.dtype != torch.float32 or isinstance(self.lm_head, QuantHead):
            raise ValueError("quantize_ needs the fp32 model")
        # The quantized head replaces the fp32 one (unless tied, its weights are then freed).
        self.lm_head = QuantHead(self.lm_head.weight, self.layout.padded_text_vocab_size)
        mlp_kind = QUANTIZED[precision]
        for layer in self.backbone.decoder_layers():
            for parent, kind in ((layer.self_attn, Int8Linear), (layer.mlp, mlp_kind)):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, kind(child.weight, child.bias))
        if many_rows is not None:
            for module in self.modules():
                if isinstance(module, Int8Linear):
                    module.many_rows = many_rows
        self.quantized = precision
        self.cast_parameters_(torch.bfloat16, adapter_dtype)
        return self

    @property
    def takes_decode_graph(self) -> bool:
        """Whether `attach_decode_graph` applies: a quantized (int8 or int4) model on a CPU."""
        return self.quantized in QUANTIZED and self.device.type == "cpu"

    def attach_decode_graph(
        self, threads: int | None = None, spinning: bool = False, accuracy_level: int = 4
    ) -> DecodeGraph:
        """Run the quantized model's decode steps through one ONNX Runtime graph of the same
        weights (model.decode_graph): ~1.5x the torch decode step in int8 (README, Decode
        graph). Set `decode_graph` to None to go back (between generations: caches are fp32
        with it)."""
        from .decode_graph import DecodeGraph

        if not self.takes_decode_graph:
            raise ValueError("the decode graph runs a quantized (int8 or int4) model on a CPU")
        self.decode_graph = DecodeGraph(self, threads, spinning, accuracy_level)
        return self.decode_graph

    def embed(self, ids: torch.Tensor, splices: Sequence[Splice] = ()) -> torch.Tensor:
        """ids (B, 8, T) global ids -> (B, T, C), the mean of the 8 stream embeddings."""
        streams = self.backbone.embed_tokens(ids)  # (B, 8, T, C)
        n_audio = self.layout.num_audio_layers
        for splice in splices:
            adapter = self.whisper_adapter if splice.adapter == "whisper" else self.vision_adapter
            if adapter is None:
                raise ValueError(f"this checkpoint has no {splice.adapter} adapter")
            adapted = adapt(adapter, splice.features.to(device=streams.device)).to(streams.dtype)  # (B, L, C)
            stop = splice.start + adapted.shape[1]
            streams[:, :n_audio, splice.start : stop] = adapted[:, None]
        # Sum the streams one by one, in stream order, as upstream does: bit-identical embeddings.
        x = streams[:, 0]
        for s in range(1, streams.shape[1]):
            x = x + streams[:, s]
        return x / streams.shape[1]

    def new_cache(self) -> KVCache:
        cfg = self.config
        return KVCache(cfg.n_layer, cfg.n_query_groups, cfg.head_size, cfg.block_size)

    @torch.inference_mode()  # caches are written in place: always as inference tensors
    def hidden_batched(self, embeds: torch.Tensor, groups: Sequence[tuple[KVCache, int, slice]]) -> torch.Tensor:
        """The one forward. embeds (N, T, C) stacks the rows of one or more responses; `groups`
        gives per response (`CacheRows`) its KV cache, the position of its first new token and
        its rows, in row order. Returns the final-normed hidden states (N, T, C).

        Every matmul runs once over all N rows; attention runs per response against its own
        cache. Caches commit (KVCache.length) only after every layer ran: a forward that
        raises leaves each response as it was, so it can be retried, alone or batched.
        """
        graph = self.decode_graph
        if graph is not None:
            embeds = embeds.float()  # fp32 activations and caches: the graph's attention's dtype
        n, t, _ = embeds.shape
        plan: list[_Attend] = []
        starts: list[int] = []
        for cache, start, rows in groups:
            if rows.start != len(starts) or rows.stop <= rows.start or rows.step not in (None, 1):
                raise ValueError("groups must cover the rows in order, one contiguous slice each")
            if any(a.rows.cache is cache for a in plan):
                raise ValueError("a KV cache appears twice in one forward")
            cache.reserve(start, start + t, embeds[rows])
            mask = None
            if t > 1 and start > 0:  # new positions after a cached prefix: causal, shifted by start
                mask = torch.ones(t, start + t, dtype=torch.bool, device=embeds.device).tril(start)
            plan.append(_Attend(CacheRows(cache, start, rows), mask, causal=t > 1 and start == 0))
            starts += [start] * (rows.stop - rows.start)
        if len(starts) != n:
            raise ValueError(f"groups cover {len(starts)} rows of {n}")
        if graph is not None and t == 1:
            if len(plan) == 1:
                h = graph.step(embeds[:, 0], plan[0].rows.cache, plan[0].rows.start)
            else:  # one call for every response: their caches share the graph's KVArena
                h = graph.step_groups(embeds[:, 0], [a.rows for a in plan])
            for a in plan:
                a.rows.cache.length = a.rows.start + 1
            return h[:, None]
        positions = torch.tensor(starts, device=embeds.device)[:, None] + torch.arange(t, device=embeds.device)
        cos, sin = rope_tables(positions, self.config.head_size, self.config.rope_base, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.backbone.decoder_layers()):
            x = layer(x, cos, sin, i, plan)
        for a in plan:  # only now: a forward that raised left every cache's valid prefix alone
            a.rows.cache.length = a.rows.start + t
        return cast(torch.Tensor, self.backbone.norm(x))

    def hidden(self, embeds: torch.Tensor, cache: KVCache, start_pos: int) -> torch.Tensor:
        """One response: embeds (B, T, C) at positions start_pos.. -> hidden states (B, T, C)."""
        return self.hidden_batched(embeds, [CacheRows(cache, start_pos, slice(0, embeds.shape[0]))])

    def hidden_step_batched(self, embeds: torch.Tensor, groups: Sequence[tuple[KVCache, int, slice]]) -> torch.Tensor:
        """`hidden_batched` for one position per row, returning (N, C): the current runner's call."""
        return self.hidden_batched(embeds, groups)[:, -1]

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., C) -> (..., 152000) logits of the text slice only."""
        head = self.lm_head
        if isinstance(head, QuantHead):
            return head.text(h)
        return F.linear(h, head.weight[: self.layout.padded_text_vocab_size])

    def audio_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., C) -> (..., 7, 4160) logits of the 7 audio slices, local ids."""
        start, stop = self.layout.audio_logits_range
        head = self.lm_head
        logits = head.audio(h) if isinstance(head, QuantHead) else F.linear(h, head.weight[start:stop])
        return logits.unflatten(-1, (self.layout.num_audio_layers, self.layout.padded_audio_vocab_size))

    def full_logits(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm_head(h))
