"""The quantized (int8, int4) decode step as one ONNX Runtime graph: every decoder layer of one
position, the KV cache read and written in place.

Why: at 2 rows a decode step is a chain of small matmuls that only read weights. Torch's int8
weight-only kernel reads them at ~10 GB/s here, ORT's MatMulNBits (int8 activations per block
of 32, VNNI dot products) at ~2x that; but as one ORT session per matmul, the hand-offs between
ORT's threads and torch's OpenMP workers ate the gain (README, Weight-only kernels). As one
graph, the step runs in ORT from the embeddings to the final norm: 24 layers in one call.

Same weights as the torch path: each matrix is the `Int8Linear`'s own int8 rows, its row scale
repeated over MatMulNBits' blocks, or the `Int4Linear`'s own 4-bit groups with their scales and
integer zero points (int4 mode's MLPs); the outlier columns, the q/k/v bias and the norms are
the same tensors too. So the two paths differ only in arithmetic (int8 vs bf16 activations; in
int4 also torch's kernel's offsets, rounded to bf16), and a
prefill (torch, a dequantized GEMM) and the steps after it (this graph) use one model.

The cache: `KVCache` holds fp32 keys and values when the graph is on (GroupQueryAttention runs
fp32 on a CPU); each layer's (B, KV, capacity, hs) slice is bound as both past and present,
so GQA writes the new position in place and reads the prefix where it lies: no copy per step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from onnx import NodeProto, TensorProto, helper, numpy_helper
from torch import nn

from .llm import Int4Linear, Int8Linear, KVArena, rope_tables

if TYPE_CHECKING:
    from .llm import CacheRows, KVCache, OmniLM

log = logging.getLogger(__name__)

BLOCK = 32  # MatMulNBits' block: the row scale is repeated over blocks of this many inputs


class _GraphBuilder:
    """Nodes and initializers of one graph, with unique names."""

    def __init__(self, accuracy_level: int) -> None:
        self.accuracy_level = accuracy_level
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def _name(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def const(self, array: np.ndarray, base: str) -> str:
        name = self._name(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self, op: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, domain: str = "", **attrs: Any
    ) -> list[str]:
        names = [self._name(op) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), names, domain=domain, **attrs))
        return names

    def norm(self, x: str, weight: torch.Tensor, eps: float) -> str:
        scale = self.const(weight.detach().float().numpy(), "norm")
        return self.node("SimplifiedLayerNormalization", [x, scale], axis=-1, epsilon=eps)[0]

    def linear(self, x: str, modules: Sequence[nn.Module]) -> str:
        """x @ W^T (+ b) for the quantized Linears `modules`, all of one kind (Int8Linear or
        Int4Linear), stacked by output rows (one fused matmul)."""
        int8s = [m for m in modules if isinstance(m, Int8Linear)]
        int4s = [m for m in modules if isinstance(m, Int4Linear)]
        parts: list[Int8Linear | Int4Linear] = [*int8s, *int4s]
        if len(parts) != len(modules) or (int8s and int4s):
            raise TypeError("the decode graph fuses Int8Linear or Int4Linear layers, one kind a matmul")
        k = parts[0].in_features
        if k % BLOCK:
            raise ValueError(f"MatMulNBits needs in_features % {BLOCK} == 0, got {k}")
        n = sum(p.out_features for p in parts)
        blocks = k // BLOCK
        extra: list[str] = []
        if int4s:
            if Int4Linear.GROUP != BLOCK:
                raise ValueError(f"the graph's 4-bit blocks are {BLOCK} inputs, Int4Linear's groups {Int4Linear.GROUP}")
            # Int4Linear's own form: two weights a byte (even input low), a scale and an integer
            # zero point per group of 32 (= BLOCK), zero points packed two a byte per row.
            packed = torch.cat([p.weight_u4 for p in int4s]).reshape(n, blocks, BLOCK // 2)
            scales = torch.cat([p.group_scales for p in int4s]).float().reshape(-1)
            zeros = torch.cat([p.zeros for p in int4s])
            if blocks % 2:
                zeros = torch.cat([zeros, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
            extra.append(self.const((zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1).numpy(), "zero"))
            bits = 4
        else:
            q = torch.cat([p.weight_int8 for p in int8s])  # (N, K) int8
            row_scales = torch.cat([p.scales for p in int8s]).float()
            # MatMulNBits' layout: B (N, K / block, block) uint8 around the zero point 128.
            packed = (q.to(torch.int16) + 128).to(torch.uint8).reshape(n, blocks, BLOCK)
            scales = row_scales[:, None].expand(n, blocks).reshape(-1)
            bits = 8
        inputs = [x, self.const(packed.numpy(), "w"), self.const(scales.numpy(), "scale"), *extra]
        y = self.node(
            "MatMulNBits", inputs, domain="com.microsoft",
            K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=self.accuracy_level,
        )[0]  # fmt: skip
        cols = torch.cat([p.outlier_cols for p in parts]).unique()  # sorted
        if cols.numel():
            # Each part's kept-out columns in bf16, zero in the other parts' rows.
            ow = torch.zeros(n, cols.numel())
            row = 0
            for p in parts:
                at = torch.searchsorted(cols, p.outlier_cols)
                ow[row : row + p.out_features, at] = p.outlier_weight.float()
                row += p.out_features
            xo = self.node("Gather", [x, self.const(cols.numpy(), "cols")], axis=1)[0]
            y = self.node("Add", [y, self.node("MatMul", [xo, self.const(ow.T.numpy(), "outliers")])[0]])[0]
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.bias.float() if p.bias is not None else torch.zeros(p.out_features) for p in parts])
            y = self.node("Add", [y, self.const(bias.detach().numpy(), "bias")])[0]
        return y


def build_step_model(llm: OmniLM, accuracy_level: int = 4) -> bytes:
    """The serialized graph. Inputs: x (N, C) fp32 embeddings of one position, seqlens_k (N,)
    int32 = each row's valid prefix, total_len () int32 = prefix + 1, past_{k,v}_{i} (N, KV,
    capacity, hs) fp32. Outputs: h (N, C) after the final norm, present_{k,v}_{i} (the same
    buffers when bound as such). accuracy_level: MatMulNBits' activation type, 4 = int8 per
    block (VNNI), 0 = fp32 (the dequantized weights, for tests)."""
    cfg = llm.config
    g = _GraphBuilder(accuracy_level)
    c, hs, kv = cfg.n_embd, cfg.head_size, cfg.n_query_groups
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["N"]),
        helper.make_tensor_value_info("total_len", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", c])]
    # RoPE angles as model.llm.rope_tables computes them (fp32), the first half of each row.
    cos, sin = rope_tables(torch.arange(cfg.block_size)[None], hs, cfg.rope_base, torch.float32)
    cos_cache = g.const(cos[0, 0, :, : hs // 2].numpy(), "cos")
    sin_cache = g.const(sin[0, 0, :, : hs // 2].numpy(), "sin")
    to_3d = g.const(np.array([0, 1, -1], dtype=np.int64), "shape")
    to_2d = g.const(np.array([0, -1], dtype=np.int64), "shape")
    qkv_split = g.const(np.array([cfg.n_head * hs, kv * hs, kv * hs], dtype=np.int64), "split")
    mlp_split = g.const(np.array([cfg.intermediate_size] * 2, dtype=np.int64), "split")
    x = "x"
    for i, layer in enumerate(llm.backbone.decoder_layers()):
        for kind in ("k", "v"):
            shape: list[str | int] = ["N", kv, "L", hs]
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, shape))
        a, m = layer.self_attn, layer.mlp
        qkv = g.linear(g.norm(x, layer.input_layernorm.weight, cfg.norm_eps), [a.q_proj, a.k_proj, a.v_proj])
        q, k, v = (g.node("Reshape", [t, to_3d])[0] for t in g.node("Split", [qkv, qkv_split], 3, axis=-1))
        attn = g.node(
            "GroupQueryAttention",
            [q, k, v, f"past_k_{i}", f"past_v_{i}", "seqlens_k", "total_len", cos_cache, sin_cache],
            [f"attn_{i}", f"present_k_{i}", f"present_v_{i}"],
            domain="com.microsoft", num_heads=cfg.n_head, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0,
        )[0]  # fmt: skip
        x = g.node("Add", [x, g.linear(g.node("Reshape", [attn, to_2d])[0], [a.o_proj])])[0]
        gate_up = g.linear(g.norm(x, layer.post_attention_layernorm.weight, cfg.norm_eps), [m.gate_proj, m.up_proj])
        gate, up = g.node("Split", [gate_up, mlp_split], 2, axis=-1)
        act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])[0]])[0], up])[0]  # silu(gate) * up
        x = g.node("Add", [x, g.linear(act, [m.down_proj])])[0]
    g.node("Identity", [g.norm(x, llm.backbone.norm.weight, cfg.norm_eps)], ["h"])
    graph = helper.make_graph(g.nodes, "omnivox_decode_step", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9  # what onnxruntime 1.2x-1.3x reads
    return model.SerializeToString()


class DecodeGraph:
    """One ORT session holding the quantized model's decode step; `step` runs one response's rows."""

    def __init__(
        self, llm: OmniLM, threads: int | None = None, spinning: bool = False, accuracy_level: int = 4
    ) -> None:
        import onnxruntime as ort

        t0 = time.perf_counter()
        self.config = llm.config
        # Every core the process may run on, as the runner's llm stage (streaming.config).
        self.threads = threads or len(os.sched_getaffinity(0))
        self.spinning = spinning
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        # Spinning workers take the core the SNAC and encoder threads run on (README, Decode graph).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        model = build_step_model(llm, accuracy_level)
        self._session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        cfg = self.config
        # Where the caches of responses stepped together live (step_groups).
        self.arena = KVArena(cfg.n_layer, cfg.n_query_groups, cfg.head_size, cfg.block_size)
        log.info(
            "decode graph: %d layers in one ONNX Runtime session (%d threads, spinning %s) in %.1f s",
            self.config.n_layer, self.threads, "on" if spinning else "off", time.perf_counter() - t0,
        )  # fmt: skip

    def step(self, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """x (B, C) fp32, one position at `start` for every row of `cache` -> h (B, C) after the
        final norm. Writes the keys and values at `start` in place; the caller reserves the slot
        (KVCache.reserve) and commits `cache.length` once every response of the step is done."""
        self._check(x, [(cache, start, x.shape[0])])
        assert cache.k is not None and cache.v is not None
        self.arena.release_freed()
        return self._run(x, cache.k, cache.v, np.full((x.shape[0],), start, dtype=np.int32))

    def step_each(self, x: torch.Tensor, groups: Sequence[CacheRows]) -> torch.Tensor:
        """`step_groups` with a call per response (each reads every weight)."""
        return torch.cat([self.step(x[g.rows], g.cache, g.start) for g in groups])

    @staticmethod
    def _check(x: torch.Tensor, caches: Sequence[tuple[KVCache, int, int]]) -> None:
        """Refuse what the graph cannot bind: per cache (cache, start, its rows of x), an fp32
        cache with those rows reserved past `start`; fp32 embeddings, a row per cache row."""
        for cache, start, rows in caches:
            if cache.k is None or cache.v is None or cache.k.dtype != torch.float32 or cache.capacity <= start:
                raise ValueError("the decode graph needs an fp32 cache reserved past the step's position")
            if cache.k.shape[1] != rows:
                raise ValueError("the decode graph takes fp32 embeddings, one row per cache row")
        if x.dtype != torch.float32 or x.shape[0] != sum(rows for _, _, rows in caches):
            raise ValueError("the decode graph takes fp32 embeddings, one row per cache row")

    def step_groups(self, x: torch.Tensor, groups: Sequence[CacheRows]) -> torch.Tensor:
        """x (N, C) fp32, one position for each row of several responses; `groups` gives each
        one's cache, position and rows of x, in order -> h (N, C). One call for them all: a
        call reads every weight once, so it costs little more than a call for one (README,
        Decode graph). Their caches join `arena` (a copy when one joins), and the call runs
        over its rows from the first stepping member's to the last's; a member in between that
        does not step rides along on a zero input, its keys written past its valid prefix
        (GroupQueryAttention writes each row at its own seqlens_k). Every row is computed on
        its own (MatMulNBits quantizes activations per row; attention is per row), so each
        response gets the bits it gets alone (tested). The caller reserved the slots
        (KVCache.reserve) and commits the lengths."""
        self._check(x, [(g.cache, g.start, g.rows.stop - g.rows.start) for g in groups])
        self.arena.release_freed()
        arena = self.arena
        arena.admit([g.cache for g in groups], max(g.start for g in groups) + 1)
        members = arena.members()
        at = {id(cache): rows for cache, rows in members}
        spans = [at[id(g.cache)] for g in groups]  # each stepping response's arena rows
        lo, hi = min(r.start for r in spans), max(r.stop for r in spans)
        seqlens = np.zeros(hi - lo, dtype=np.int32)
        stepping = {id(g.cache) for g in groups}
        for cache, rows in members:
            if lo <= rows.start < hi and id(cache) not in stepping:
                assert cache is not None  # admit dropped the freed ones
                if cache.length >= arena.capacity:  # a full window: no slot to ride in
                    return self.step_each(x, groups)
                seqlens[rows.start - lo : rows.stop - lo] = cache.length
        for g, rows in zip(groups, spans, strict=True):
            seqlens[rows.start - lo : rows.stop - lo] = g.start
        index = torch.cat([torch.arange(r.start, r.stop) for r in spans]) - lo
        xs = x.new_zeros(hi - lo, x.shape[1])
        xs[index] = x
        assert arena.k is not None and arena.v is not None
        return self._run(xs, arena.k[:, lo:hi], arena.v[:, lo:hi], seqlens)[index]

    def _run(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: np.ndarray) -> torch.Tensor:
        """The graph over x (B, C) with k, v (n_layer, B, KV, capacity, hs), each row at its
        seqlens position; each layer's slice is bound as past and present (written in place)."""
        x = x.contiguous()
        rows = x.shape[0]
        binding = self._session.io_binding()
        binding.bind_input("x", "cpu", 0, np.float32, [rows, self.config.n_embd], x.data_ptr())
        binding.bind_cpu_input("seqlens_k", seqlens)
        binding.bind_cpu_input("total_len", np.array(int(seqlens.max()) + 1, dtype=np.int32))
        shape = list(k.shape[1:])
        for i in range(self.config.n_layer):
            for kind, buffer in (("k", k[i]), ("v", v[i])):
                assert buffer.is_contiguous()
                binding.bind_input(f"past_{kind}_{i}", "cpu", 0, np.float32, shape, buffer.data_ptr())
                binding.bind_output(f"present_{kind}_{i}", "cpu", 0, np.float32, shape, buffer.data_ptr())
        h = torch.empty(rows, self.config.n_embd)
        binding.bind_output("h", "cpu", 0, np.float32, [rows, self.config.n_embd], h.data_ptr())
        self._session.run_with_iobinding(binding)
        return h
