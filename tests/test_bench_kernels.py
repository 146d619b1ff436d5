"""`omnivox bench kernels` on tiny shapes: every candidate this host has runs, reports its
fields, and agrees with fp32 (a broken wrapper — wrong layout, scales, nibble order — fails)."""

from __future__ import annotations

import pytest

from benchmarks.kernels import CHAIN_CALLS, CHAIN_GRAPH, MATRICES, Shapes, all_kernels, bench_kernels
from omnivox.cli import build_parser

TINY = Shapes(n_embd=128, intermediate=256, qkv_out=192, text_rows=320, audio_rows=64, n_layers=2)


@pytest.fixture(scope="module")
def result() -> dict:
    names = [k.name for k in all_kernels(threads=1)[0]]  # the opt-in ones too
    return bench_kernels(rows=(1, 2), repeats=2, min_s=0.0, shapes=TINY, candidates=names, log=None)


def test_fields_and_coverage(result: dict) -> None:
    assert result["benchmark"] == "kernels"
    assert {"cpu_model", "cores", "threads", "torch"} <= set(result["machine"])
    failed = {k: v for k, v in result["skipped"].items() if v.startswith("prepare failed")}
    assert not failed  # every candidate this host has (openvino is optional) prepared
    names = set(result["candidates"])
    assert {"torch-fp32", "torch-bf16", "torch-int8-wo", "torch-int4-wo-g32", "torch-int8-dyn"} <= names
    for row in result["results"]:
        assert {"candidate", "shape", "rows", "weight_bytes", "ms", "gb_per_s", "max_abs_rel_err", "cosine"} <= set(row)
        assert row["ms"] > 0 and row["gb_per_s"] >= 0 and row["weight_bytes"] > 0
    for name in names:
        for rows in (1, 2):
            shapes = {r["shape"] for r in result["results"] if r["candidate"] == name and r["rows"] == rows}
            assert {*MATRICES, CHAIN_CALLS} <= shapes, (name, rows, shapes)
            if name.startswith(("ort-", "ov-")):
                assert CHAIN_GRAPH in shapes


def test_weight_bytes_follow_the_format(result: dict) -> None:
    def nbytes(name: str) -> int:
        return next(r["weight_bytes"] for r in result["results"] if r["candidate"] == name and r["shape"] == "fc")

    n, k = TINY.intermediate, TINY.n_embd
    assert nbytes("torch-fp32") == 4 * n * k
    assert nbytes("torch-bf16") == 2 * n * k
    assert n * k < nbytes("torch-int8-wo") < 1.1 * n * k
    assert n * k / 2 < nbytes("torch-int4-wo-g32") < 0.7 * n * k


def test_agreement_with_fp32(result: dict) -> None:
    for row in result["results"]:
        four_bit = "int4" in row["candidate"] or "nbits4" in row["candidate"]
        max_err, min_cos = (0.35, 0.98) if four_bit else (0.05, 0.999)
        assert row["max_abs_rel_err"] < max_err, row
        assert row["cosine"] > min_cos, row
        if row["candidate"] == "torch-fp32":
            assert row["max_abs_rel_err"] < 1e-5


def test_cli_wiring() -> None:
    args = build_parser().parse_args(["bench", "kernels", "--rows", "1", "--repeats", "3", "--json", "x.json"])
    assert args.rows == (1,) and args.repeats == 3 and args.func.__name__ == "cmd_bench_kernels"
