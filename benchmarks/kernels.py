"""`omnivox bench kernels`: weight-only quantized matmul kernels for the decode step, side by side.

Random weights shaped like Mini-Omni's (normal(0, 0.02)), inputs like the LLM's normed
hidden states (normal(0, 1)), rows = the decode batch (1 or 2). Per candidate kernel and
shape: median ms per call, effective GB/s (the bytes of the weights as the kernel stores
them, scales included, divided by the time) and agreement with fp32 (max abs error / max
abs of the fp32 output, and cosine).

Shapes: one layer's qkv [1152, 896], attention proj [896, 896], fc [4864, 896] (two per
layer), MLP proj [896, 4864], the head's text slice [152000, 896] and one audio slice
[4160, 896]; the single-layer matrices fit in the 32 MB L3 and are timed hot (many calls
in a row), so they show the kernel's compute rate. "24 layers" chains all 24 layers'
matmuls (120 separate weights, 10x the cache: this one is memory-bound) with a residual
stream: a = qkv(x)[:, :n_embd]; h = x + o(a); x' = h + proj(fc_1(h) * fc_2(h)), once as
one Python/library call per matmul and, for the graph runtimes (ONNX Runtime, OpenVINO),
once as ONE session / compiled model holding the whole chain (the per-call overhead is
the difference).

Model code is untouched: `model/llm.py`'s int8 mode is `torch-int8-wo` here (without its
outlier columns, which random normal weights do not have).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .machine import machine_info

MATRICES = ("qkv", "attn_proj", "fc", "mlp_proj", "head_text", "head_audio")
CHAIN_CALLS = "24L_calls"
CHAIN_GRAPH = "24L_graph"


@dataclass(frozen=True)
class Shapes:
    n_embd: int = 896
    intermediate: int = 4864
    qkv_out: int = 1152
    text_rows: int = 152000
    audio_rows: int = 4160
    n_layers: int = 24

    def layer(self) -> dict[str, tuple[int, int]]:
        e, i = self.n_embd, self.intermediate
        return {"qkv": (self.qkv_out, e), "attn_proj": (e, e), "fc_1": (i, e), "fc_2": (i, e), "mlp_proj": (e, i)}


# ---------------------------------------------------------------- quantizers (shared)


def _q_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output row (as model/llm.py's Int8Linear)."""
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def _q_blocks(w: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block quantization along the input dim: q in [-2^(b-1), 2^(b-1)-1], scales [out, in/block]."""
    n, k = w.shape
    wg = w.reshape(n, k // block, block)
    qmax = 2 ** (bits - 1) - 1
    scales = wg.abs().amax(dim=-1).clamp(min=1e-12) / qmax
    q = torch.round(wg / scales[..., None]).clamp(-qmax - 1, qmax).to(torch.int8)
    return q.reshape(n, k), scales


def _fits(block: int | None, out_multiple: int = 1) -> Callable[[int, int], str | None]:
    """A kernel's shape rule: in % block == 0 (and out % out_multiple == 0), else why not."""

    def fits(n: int, k: int) -> str | None:
        if block and k % block:
            return f"in={k} not a multiple of {block}"
        return f"out={n} not a multiple of {out_multiple}" if n % out_multiple else None

    return fits


def _nbytes(*arrays: Any) -> int:
    return int(sum(a.numel() * a.element_size() if isinstance(a, torch.Tensor) else a.nbytes for a in arrays))


# ---------------------------------------------------------------- candidates


@dataclass
class Kernel:
    """One candidate: how to store a weight, multiply by it, and move activations in and out."""

    name: str
    what: str
    prepare: Callable[[torch.Tensor], tuple[Any, int]]  # fp32 [out, in] -> (handle, weight bytes)
    linear: Callable[[Any, Any], Any]  # (handle, x in the kernel's activation type) -> y
    to_input: Callable[[torch.Tensor], Any] = lambda x: x
    to_float: Callable[[Any], torch.Tensor] = lambda y: y.float()
    # Optional whole-chain graph: (layers of fp32 weights) -> callable(x) in the kernel's activation type.
    build_chain: Callable[[list[dict[str, torch.Tensor]], int], Callable[[Any], Any]] | None = None
    fits: Callable[[int, int], str | None] = lambda n, k: None  # (out, in) -> reason it can't, or None


def _int4_mm(group: int, h: Any, x: torch.Tensor) -> torch.Tensor:
    return torch._weight_int4pack_mm_for_cpu(x.contiguous(), h[0], group, h[1])


def _torch_kernels(int4_groups: Sequence[int]) -> list[Kernel]:
    bf = torch.bfloat16
    ks = [
        Kernel(
            "torch-fp32",
            "F.linear, fp32 (the reference)",
            lambda w: (w, _nbytes(w)),
            lambda h, x: F.linear(x, h),
        ),
        Kernel(
            "torch-bf16",
            "F.linear, bf16 weights and activations",
            lambda w: (lambda wb: (wb, _nbytes(wb)))(w.to(bf)),
            lambda h, x: F.linear(x, h),
            to_input=lambda x: x.to(bf),
        ),
    ]

    def prep_int8(w: torch.Tensor) -> tuple[Any, int]:
        q, s = _q_rows_int8(w)
        sb = s.to(bf)
        return (q, sb), _nbytes(q, sb)

    ks.append(
        Kernel(
            "torch-int8-wo",
            "torch._weight_int8pack_mm: int8 rows x bf16 scale, bf16 activations (model/llm.py's int8)",
            prep_int8,
            lambda h, x: torch._weight_int8pack_mm(x.contiguous(), h[0], h[1]),
            to_input=lambda x: x.to(bf),
        )
    )

    for g in int4_groups:

        def prep_int4(w: torch.Tensor, g: int = g) -> tuple[Any, int]:
            q, s = _q_blocks(w, 4, g)  # symmetric: w = (u - 8) * scale with u = q + 8
            u = (q.to(torch.int32) + 8).contiguous()
            packed = torch._convert_weight_to_int4pack_for_cpu(u, 1)
            # torch's CPU int4 kernel: w = (u - 8) * scale + zero, scales_and_zeros [in/g, out, 2]
            sz = torch.stack([s, torch.zeros_like(s)], dim=-1).transpose(0, 1).contiguous().to(bf)
            return (packed, sz), _nbytes(packed, sz)

        ks.append(
            Kernel(
                f"torch-int4-wo-g{g}",
                f"torch._weight_int4pack_mm_for_cpu: int4, bf16 scale per {g} inputs, bf16 activations",
                prep_int4,
                functools.partial(_int4_mm, g),
                to_input=lambda x: x.to(bf),
                fits=_fits(g, 16),  # _convert_weight_to_int4pack_for_cpu needs out % 16 == 0
            )
        )

    def prep_int_mm(w: torch.Tensor) -> tuple[Any, int]:
        q, s = _q_rows_int8(w)
        qt = q.t().contiguous()  # [in, out]: _int_mm's faster layout on this CPU
        return (qt, s), _nbytes(qt, s)

    def int_mm(h: Any, x: torch.Tensor) -> torch.Tensor:
        sx = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        xq = torch.round(x / sx).to(torch.int8).contiguous()
        return torch._int_mm(xq, h[0]) * sx * h[1]

    ks.append(
        Kernel(
            "torch-int8-dyn",
            "torch._int_mm int8 x int8 -> int32 (oneDNN, VNNI): per-row activation scales computed per call",
            prep_int_mm,
            int_mm,
        )
    )

    def prep_dyn4(w: torch.Tensor) -> tuple[Any, int]:
        n, k = w.shape
        q, s = _q_blocks(w, 4, 32)
        u = (q + 8).to(torch.uint8)
        packed = torch._dyn_quant_pack_4bit_weight((u[:, 1::2] << 4 | u[:, 0::2]).contiguous(), s, None, 32, k, n)
        return (packed, k, n), _nbytes(packed)

    ks.append(
        Kernel(
            "torch-int4-dyn-g32",
            "torch._dyn_quant_matmul_4bit (KleidiAI on Arm; a reference fallback elsewhere)",
            prep_dyn4,
            lambda h, x: torch._dyn_quant_matmul_4bit(x.contiguous(), h[0], 32, h[1], h[2]),
            fits=_fits(32),
        )
    )
    return ks


def _ort_kernels(bits_blocks: Sequence[tuple[int, int, int]], threads: int) -> list[Kernel]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def quant(w: torch.Tensor, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """MatMulNBits' layout: B [N, K/block, block*bits/8] uint8 (4-bit: low nibble first), scales [N*K/block];
        no zero_points input = the default zero point 2^(bits-1)."""
        n, k = w.shape
        q, s = _q_blocks(w, bits, block)
        u = (q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8).reshape(n, k // block, block)
        if bits == 4:
            u = u[..., 0::2] | (u[..., 1::2] << 4)
        return u.contiguous().numpy(), s.reshape(-1).contiguous().numpy()

    def session(model: Any, spin: bool = True) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if not spin:  # 120 sessions' thread pools spinning on 2 cores starve each other (2.7 s per chain)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def model_of(nodes: list[Any], inits: list[Any], k_in: int, n_out: int) -> Any:
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k_in])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n_out])],
            initializer=inits,
        )
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=onnx.IR_VERSION)

    out = []
    for bits, block, acc in bits_blocks:

        def mm_node(name: str, w: torch.Tensor, x: str, y: str, bits: int = bits, block: int = block, acc: int = acc):
            n, k = w.shape
            q, s = quant(w, bits, block)
            node = helper.make_node(
                "MatMulNBits", [x, f"{name}.B", f"{name}.s"], [y], domain="com.microsoft",
                K=k, N=n, bits=bits, block_size=block, accuracy_level=acc,
            )  # fmt: skip
            inits = [numpy_helper.from_array(q, f"{name}.B"), numpy_helper.from_array(s, f"{name}.s")]
            return node, inits, q.nbytes + s.nbytes

        def prepare(w: torch.Tensor, mm_node: Any = mm_node) -> tuple[Any, int]:
            node, inits, nbytes = mm_node("w", w, "x", "y")
            return session(model_of([node], inits, w.shape[1], w.shape[0]), spin=False), nbytes

        def build_chain(layers: list[dict[str, torch.Tensor]], n_embd: int, mm_node: Any = mm_node) -> Any:
            nodes: list[Any] = []
            inits: list[Any] = [
                numpy_helper.from_array(np.array([0], np.int64), "s0"),
                numpy_helper.from_array(np.array([n_embd], np.int64), "s1"),
                numpy_helper.from_array(np.array([1], np.int64), "ax"),
            ]
            x = "x"
            for i, lw in enumerate(layers):
                p = f"l{i}"
                for name, src, dst in (("qkv", x, f"{p}.qkv"),):
                    n, ini, _ = mm_node(f"{p}.{name}", lw[name], src, dst)
                    nodes.append(n)
                    inits += ini
                nodes.append(helper.make_node("Slice", [f"{p}.qkv", "s0", "s1", "ax"], [f"{p}.a"]))
                for name, src, dst in (("attn_proj", f"{p}.a", f"{p}.o"),):
                    n, ini, _ = mm_node(f"{p}.{name}", lw[name], src, dst)
                    nodes.append(n)
                    inits += ini
                nodes.append(helper.make_node("Add", [x, f"{p}.o"], [f"{p}.h"]))
                for name in ("fc_1", "fc_2"):
                    n, ini, _ = mm_node(f"{p}.{name}", lw[name], f"{p}.h", f"{p}.{name}")
                    nodes.append(n)
                    inits += ini
                nodes.append(helper.make_node("Mul", [f"{p}.fc_1", f"{p}.fc_2"], [f"{p}.m"]))
                n, ini, _ = mm_node(f"{p}.mlp_proj", lw["mlp_proj"], f"{p}.m", f"{p}.p")
                nodes.append(n)
                inits += ini
                x = f"{p}.out" if i < len(layers) - 1 else "y"
                nodes.append(helper.make_node("Add", [f"{p}.h", f"{p}.p"], [x]))
            sess = session(model_of(nodes, inits, n_embd, n_embd))
            return lambda xa: sess.run(None, {"x": xa})[0]

        out.append(
            Kernel(
                f"ort-nbits{bits}-b{block}-acc{acc}",
                f"ONNX Runtime MatMulNBits bits={bits} block_size={block} accuracy_level={acc}"
                + (" (int8 activations per block, VNNI)" if acc == 4 else " (fp32 compute)"),
                prepare,
                lambda sess, x: sess.run(None, {"x": np.ascontiguousarray(x)})[0],
                to_input=lambda x: x.float().numpy(),
                to_float=lambda y: torch.from_numpy(np.asarray(y, np.float32)),
                build_chain=build_chain,
                fits=_fits(block),
            )
        )
    return out


def _ov_kernels(variants: Sequence[tuple[str, int | None]], threads: int) -> list[Kernel]:
    import openvino as ov
    import openvino.opset13 as ops

    core = ov.Core()

    def weight_node(w: torch.Tensor, kind: str, group: int | None) -> tuple[Any, int]:
        """Compressed constant -> Convert(f16) -> Multiply(f16 scale) -> Convert(f32): the pattern the CPU
        plugin folds into its weight-decompressing FullyConnected."""
        n, k = w.shape
        if kind == "int8":
            q, s = _q_rows_int8(w)
            qn, sn = q.numpy(), s[:, None].numpy().astype(np.float16)
            dq = ops.multiply(ops.convert(ops.constant(qn), ov.Type.f16), ops.constant(sn))
            return ops.convert(dq, ov.Type.f32), qn.nbytes + sn.nbytes
        assert group is not None
        q, s = _q_blocks(w, 4, group)
        qn = q.reshape(n, k // group, group).numpy()
        sn = s[..., None].numpy().astype(np.float16)
        dq = ops.multiply(ops.convert(ops.constant(qn, ov.Type.i4), ov.Type.f16), ops.constant(sn))
        return ops.convert(ops.reshape(dq, [n, k], False), ov.Type.f32), qn.size // 2 + sn.nbytes

    def compile_model(outputs: Any, param: Any) -> Any:
        model = ov.Model([outputs], [param])
        cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        req = core.compile_model(model, "CPU", cfg).create_infer_request()
        return lambda x: req.infer({0: x})[0]

    out = []
    for kind, group in variants:

        def prepare(w: torch.Tensor, kind: str = kind, group: int | None = group) -> tuple[Any, int]:
            p = ops.parameter([-1, w.shape[1]], ov.Type.f32)
            wn, nbytes = weight_node(w, kind, group)
            return compile_model(ops.matmul(p, wn, False, True), p), nbytes

        def build_chain(layers: list[dict[str, torch.Tensor]], n_embd: int, kind: str = kind,
                        group: int | None = group) -> Any:  # fmt: skip
            p = ops.parameter([-1, n_embd], ov.Type.f32)
            x: Any = p

            def mm(v: Any, w: torch.Tensor) -> Any:
                return ops.matmul(v, weight_node(w, kind, group)[0], False, True)

            for lw in layers:
                qkv = mm(x, lw["qkv"])
                a = ops.slice(qkv, np.array([0]), np.array([n_embd]), np.array([1]), np.array([1]))
                h = ops.add(x, mm(a, lw["attn_proj"]))
                x = ops.add(h, mm(ops.multiply(mm(h, lw["fc_1"]), mm(h, lw["fc_2"])), lw["mlp_proj"]))
            return compile_model(x, p)

        name = "ov-int8-rows" if kind == "int8" else f"ov-int4-g{group}"
        what = (
            "OpenVINO CPU, int8 weights, f16 scale per row" if kind == "int8"
            else f"OpenVINO CPU, int4 weights, f16 scale per {group} inputs"
        ) + ", fp32 activations (weight-decompressing FullyConnected)"  # fmt: skip
        out.append(
            Kernel(
                name,
                what,
                prepare,
                lambda f, x: f(np.ascontiguousarray(x)),
                to_input=lambda x: x.float().numpy(),
                to_float=lambda y: torch.from_numpy(np.asarray(y, np.float32)),
                build_chain=build_chain,
                fits=_fits(group),
            )
        )
    return out


DEFAULT_SKIP = {
    "torch-int4-dyn-g32": "opt-in (--candidates): on x86 torch has no kernel behind _dyn_quant_matmul_4bit "
    "(KleidiAI is Arm-only); the fallback stores ~2 bytes per weight and ran 14.9 ms for [4864, 896] "
    "(55x torch-int8-wo)",
}


def all_kernels(threads: int, int4_groups: Sequence[int] = (32, 64, 128),
                ort_variants: Sequence[tuple[int, int, int]] = ((8, 32, 0), (8, 32, 4), (4, 32, 0), (4, 32, 4)),
                ov_variants: Sequence[tuple[str, int | None]] = (("int8", None), ("int4", 32), ("int4", 128)),
                ) -> tuple[list[Kernel], dict[str, str]]:  # fmt: skip
    """Every candidate this host can run, and why the others can't."""
    kernels = _torch_kernels(int4_groups)
    skipped: dict[str, str] = {}
    try:
        kernels += _ort_kernels(ort_variants, threads)
    except ImportError as e:
        skipped["ort-nbits*"] = f"needs the onnx package to build the graph ({e})"
    try:
        kernels += _ov_kernels(ov_variants, threads)
    except ImportError as e:
        skipped["ov-*"] = f"openvino not installed ({e})"
    return kernels, skipped


# ---------------------------------------------------------------- measuring


def _chain(linear: Callable[[Any, Any], Any], handles: list[dict[str, Any]], n_embd: int, x: Any) -> Any:
    for h in handles:
        a = linear(h["attn_proj"], linear(h["qkv"], x)[:, :n_embd])
        hh = x + a
        x = hh + linear(h["mlp_proj"], linear(h["fc_1"], hh) * linear(h["fc_2"], hh))
    return x


def _time(fn: Callable[[], Any], repeats: int, min_s: float) -> list[float]:
    """ms per call, one sample per repeat; a repeat loops the call until min_s has passed (hot cache)."""
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(min_s / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1000)
    return samples


def _agreement(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    y, ref = y.float().reshape(-1), ref.float().reshape(-1)
    return {
        "max_abs_rel_err": float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30)),
        "cosine": float(F.cosine_similarity(y, ref, dim=0)),
    }


@dataclass
class _Weights:
    layers: list[dict[str, torch.Tensor]]
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    def matrix(self, name: str) -> torch.Tensor:
        if name.startswith("head_"):
            return self.head[name]
        return self.layers[0]["fc_1" if name == "fc" else name]


@dataclass
class _Prepared:
    """One kernel's stored weights: the single matrices and, when every layer matrix fits it, the 24-layer chain."""

    kern: Kernel
    n_embd: int
    reasons: dict[str, str | None]
    handles: dict[str, tuple[Any, int]]
    chain_handles: list[dict[str, Any]]
    chain_bytes: int
    graph: Callable[[Any], Any] | None

    @classmethod
    def build(cls, kern: Kernel, w: _Weights, sh: Shapes) -> _Prepared:
        reasons = {name: kern.fits(*w.matrix(name).shape) for name in MATRICES}
        reasons.update({f"chain.{n}": kern.fits(*nk) for n, nk in sh.layer().items()})
        handles = {n: kern.prepare(w.matrix(n)) for n in MATRICES if not reasons[n]}
        chain_ok = not any(v for k, v in reasons.items() if k.startswith("chain."))
        chain_handles: list[dict[str, Any]] = []
        chain_bytes = 0
        if chain_ok:
            for i, lw in enumerate(w.layers):
                reuse = {"qkv": "qkv", "attn_proj": "attn_proj", "fc_1": "fc", "mlp_proj": "mlp_proj"}
                done = {n: handles[reuse[n]] if i == 0 and n in reuse else kern.prepare(m) for n, m in lw.items()}
                chain_handles.append({n: h for n, (h, _) in done.items()})
                chain_bytes += sum(b for _, b in done.values())
        graph = kern.build_chain(w.layers, sh.n_embd) if chain_ok and kern.build_chain else None
        return cls(kern, sh.n_embd, reasons, handles, chain_handles, chain_bytes, graph)

    def cases(self) -> list[tuple[str, Callable[[Any], Any], int, str]]:
        """(shape name, x -> y, weight bytes, reference key)"""
        linear = self.kern.linear
        out: list[tuple[str, Callable[[Any], Any], int, str]] = []
        for name, (h, nb) in self.handles.items():
            out.append((name, functools.partial(linear, h), nb, name))
        if self.chain_handles:
            out.append((CHAIN_CALLS, lambda x: _chain(linear, self.chain_handles, self.n_embd, x), self.chain_bytes,
                        "chain"))  # fmt: skip
            if self.graph is not None:
                out.append((CHAIN_GRAPH, self.graph, self.chain_bytes, "chain"))
        return out


def bench_kernels(
    *,
    rows: Sequence[int] = (1, 2),
    repeats: int = 7,
    min_s: float = 0.05,
    shapes: Shapes | None = None,
    candidates: Sequence[str] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Time every candidate (or those named) on the decode-step shapes; see the module doc."""
    sh = shapes or Shapes()
    threads = torch.get_num_threads()
    kernels, skipped = all_kernels(threads)
    if candidates:
        unknown = set(candidates) - {k.name for k in kernels}
        if unknown:
            raise ValueError(f"unknown candidates {sorted(unknown)}; have {[k.name for k in kernels]}")
        kernels = [k for k in kernels if k.name in candidates]
    else:
        skipped.update({k: v for k, v in DEFAULT_SKIP.items() if any(x.name == k for x in kernels)})
        kernels = [k for k in kernels if k.name not in DEFAULT_SKIP]

    gen = torch.Generator().manual_seed(seed)

    def rand(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, generator=gen) * 0.02

    t0 = time.perf_counter()
    w = _Weights([{name: rand(*nk) for name, nk in sh.layer().items()} for _ in range(sh.n_layers)])
    w.head = {"head_text": rand(sh.text_rows, sh.n_embd), "head_audio": rand(sh.audio_rows, sh.n_embd)}
    if log:
        log(f"random weights in {time.perf_counter() - t0:.1f} s")
    inputs = {r: torch.randn(r, sh.n_embd, generator=gen) for r in rows}
    mlp_inputs = {r: torch.randn(r, sh.intermediate, generator=gen) * 0.5 for r in rows}  # fc_1 x fc_2 scale

    def x_for(name: str, r: int) -> torch.Tensor:
        return mlp_inputs[r] if name == "mlp_proj" else inputs[r]

    refs = {(name, r): F.linear(x_for(name, r), w.matrix(name)) for name in MATRICES for r in rows}
    full = [{n: (m, 0) for n, m in lw.items()} for lw in w.layers]
    for r in rows:
        refs[("chain", r)] = _chain(lambda h, x: F.linear(x, h[0]), full, sh.n_embd, inputs[r])

    results: list[dict[str, Any]] = []
    for kern in kernels:
        t0 = time.perf_counter()
        try:
            prepared = _Prepared.build(kern, w, sh)
        except Exception as e:  # a kernel this build or CPU lacks: say so, measure the rest
            skipped[kern.name] = f"prepare failed: {type(e).__name__}: {e}"
            if log:
                log(f"{kern.name}: {skipped[kern.name]}")
            continue
        prep_s = time.perf_counter() - t0
        skipped.update({f"{kern.name}/{n}": r for n, r in prepared.reasons.items() if r and n in MATRICES})
        with torch.inference_mode():
            for r in rows:
                for case, fn, nbytes, ref_key in prepared.cases():
                    x = kern.to_input(inputs[r] if ref_key == "chain" else x_for(case, r))
                    try:
                        y = kern.to_float(fn(x))
                        samples = _time(functools.partial(fn, x), repeats, min_s)
                    except Exception as e:
                        skipped[f"{kern.name}/{case}/rows={r}"] = f"{type(e).__name__}: {e}"
                        continue
                    ms = statistics.median(samples)
                    results.append(
                        {
                            "candidate": kern.name,
                            "shape": case,
                            "rows": r,
                            "weight_shape": None if ref_key == "chain" else list(w.matrix(case).shape),
                            "weight_bytes": nbytes,
                            "ms": round(ms, 4),
                            "gb_per_s": round(nbytes / (ms / 1000) / 1e9, 2),
                            "samples_ms": [round(s, 4) for s in samples],
                            **{k: round(v, 6) for k, v in _agreement(y, refs[(ref_key, r)]).items()},
                        }
                    )
        if log:
            log(f"{kern.name}: prepared in {prep_s:.1f} s, measured in {time.perf_counter() - t0 - prep_s:.1f} s")
        del prepared
    return {
        "benchmark": "kernels",
        "machine": machine_info("cpu"),
        "shapes": {**sh.__dict__, "layer": {k: list(v) for k, v in sh.layer().items()}},
        "rows": list(rows),
        "repeats": repeats,
        "min_s_per_repeat": min_s,
        "weights": "normal(0, 0.02); inputs normal(0, 1) (mlp_proj's: normal(0, 0.5)); seed " + str(seed),
        "candidates": {k.name: k.what for k in kernels},
        "skipped": skipped,
        "results": results,
    }


def print_table(result: dict[str, Any]) -> None:
    res = result["results"]
    m = result["machine"]
    print(f"{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}; ms per call (GB/s of weights read)")
    shapes = [s for s in (*MATRICES, CHAIN_CALLS, CHAIN_GRAPH) if any(r["shape"] == s for r in res)]
    names = list(dict.fromkeys(r["candidate"] for r in res))
    for rows in result["rows"]:
        print(f"\nrows = {rows}")
        print("| candidate | " + " | ".join(shapes) + " | err (max) | cos (min) |")
        print("| --- " * (len(shapes) + 3) + "|")
        for n in names:
            cells, errs, coss = [], [], []
            for s in shapes:
                hit = [r for r in res if r["candidate"] == n and r["shape"] == s and r["rows"] == rows]
                if hit:
                    cells.append(f"{hit[0]['ms']:.3f} ({hit[0]['gb_per_s']:.0f})")
                    errs.append(hit[0]["max_abs_rel_err"])
                    coss.append(hit[0]["cosine"])
                else:
                    cells.append("-")
            err = f"{max(errs):.2%}" if errs else "-"
            cos = f"{min(coss):.5f}" if coss else "-"
            print(f"| {n} | " + " | ".join(cells) + f" | {err} | {cos} |")
    if result["skipped"]:
        print("\nskipped:")
        for k, v in result["skipped"].items():
            print(f"  {k}: {v}")
