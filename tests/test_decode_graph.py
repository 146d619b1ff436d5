"""The int8 decode step as one ONNX Runtime graph (model.decode_graph)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.decoding import SamplingConfig, step_batch
from model.llm import Int8Linear, OmniLM
from model.omni import OmniModel
from model.prompts import Task, build_prompt


@pytest.fixture(scope="module")
def int8_model(tiny_ckpt) -> OmniModel:
    return OmniModel.load(tiny_ckpt, dtype="int8", with_whisper=False, with_snac=False)


def _dequantized_fp32(llm: OmniLM) -> OmniLM:
    """The int8 model's own weights (int8 rows times scales, outlier columns, bf16 biases and
    norms) in an fp32 model without the graph: what the graph computes, in exact arithmetic."""
    ref = copy.deepcopy(llm.backbone)
    for layer in ref.decoder_layers():
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Int8Linear):
                    w = child.weight_int8.float() * child.scales.float()[:, None]  # not rounded to bf16
                    w[:, child.outlier_cols] = child.outlier_weight.float()
                    lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                    lin.weight.data = w
                    if child.bias is not None:
                        lin.bias.data = child.bias.float()
                    setattr(parent, name, lin)
    out = OmniLM(llm.config)
    out.backbone = ref.float()
    return out


def _prefilled(llm: OmniLM, rows: int = 2, length: int = 12):
    torch.manual_seed(0)
    cache = llm.new_cache()
    llm.hidden(torch.randn(rows, length, llm.config.n_embd) * 0.1, cache, 0)
    return cache


def test_graph_step_is_the_int8_models_forward(tiny_ckpt) -> None:
    """With fp32 activations (accuracy level 0) the graph equals the torch forward over the
    same dequantized weights, hidden states and the KV it writes in place: the fused q/k/v and
    gate/up, the outlier columns, biases, norms, RoPE and the cached prefix all wired right."""
    llm = OmniModel.load(tiny_ckpt, dtype="float32", with_whisper=False, with_snac=False).llm
    first, second = llm.backbone.decoder_layers()
    with torch.no_grad():  # an outlier column in an MLP too
        first.mlp.down_proj.weight[:, 5] *= 20
    llm.quantize_("int8")
    # Fused q/k/v whose parts keep different columns out (the tiny checkpoint's own weights).
    attn = second.self_attn
    assert [p.outlier_cols.tolist() for p in (attn.q_proj, attn.k_proj, attn.v_proj)] == [[], [1], [3]]
    assert first.mlp.down_proj.outlier_cols.tolist() == [5]
    ref = _dequantized_fp32(llm)
    llm.attach_decode_graph(accuracy_level=0)
    caches = [_prefilled(ref), _prefilled(ref)]  # one prefix (the int8 prefill rounds to bf16)
    for k in range(3):
        x = torch.randn(2, 1, llm.config.n_embd) * 0.1
        want, got = (m.hidden(x, c, 12 + k) for m, c in zip((ref, llm), caches, strict=True))
        assert caches[1].length == 13 + k and caches[1].k.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < 1e-4
    stop = caches[0].length
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        assert float((b[..., :stop, :] - a[..., :stop, :]).norm() / a[..., :stop, :].norm()) < 1e-4


def test_graph_with_int8_activations_stays_near_the_torch_step(int8_model: OmniModel) -> None:
    """The default (int8 activations per block of 32, VNNI) against torch's int8 kernel on the
    same weights (bf16 activations): two roundings of one model."""
    llm = int8_model.llm
    graph = llm.decode_graph
    assert graph is not None
    try:
        hs = []
        for attached in (None, graph):
            llm.decode_graph = attached
            cache = _prefilled(llm)
            hs.append(llm.hidden(torch.ones(2, 1, llm.config.n_embd) * 0.05, cache, 12).float())
    finally:
        llm.decode_graph = graph
    assert float((hs[1] - hs[0]).norm() / hs[0].norm()) < 0.05  # measured 1.1-1.7% on the tiny model


def test_load_attaches_the_graph_for_int8_on_cpu_only(tiny_ckpt, int8_model: OmniModel) -> None:
    assert int8_model.llm.decode_graph is not None
    plain = OmniModel.load(tiny_ckpt, dtype="int8", with_whisper=False, with_snac=False, decode_graph=False)
    assert plain.llm.decode_graph is None
    int4 = OmniModel.load(tiny_ckpt, dtype="int4", with_whisper=False, with_snac=False)
    assert int4.llm.decode_graph is None
    fp32 = OmniModel.load(tiny_ckpt, dtype="float32", with_whisper=False, with_snac=False)
    with pytest.raises(ValueError, match="int8 model on a CPU"):
        fp32.llm.attach_decode_graph()


def _tokens(gens) -> list:
    return [[g.result().text_steps, g.result().audio_steps.tolist()] for g in gens]


def _prompt(model: OmniModel, frames: int, seed: int = 1):
    feats = torch.randn(frames, model.config.whisper_adapter_dim, generator=torch.Generator().manual_seed(seed))
    return build_prompt(Task.A1A2, model.layout, audio_features=feats)


def test_batched_responses_get_the_tokens_they_get_alone(
    int8_model: OmniModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to MAX_GROUPS responses each run their own graph call: their tokens are those of
    each alone (a batched torch step would round them differently)."""
    prompts = [_prompt(int8_model, 20), _prompt(int8_model, 27, seed=2)]
    sampling = SamplingConfig(temperature=0.9, top_k=50, seed=3)

    def start():
        return [int8_model.start(p, sampling, max_new_tokens=12, stop_rules=False) for p in prompts]

    alone = start()
    for g in alone:
        g.run()
    together = start()
    calls = []
    graph = int8_model.llm.decode_graph
    assert graph is not None and graph.MAX_GROUPS >= 2
    real_step = graph.step
    monkeypatch.setattr(graph, "step", lambda *a: calls.append(1) or real_step(*a))
    while any(g.stop is None for g in together):
        step_batch([g for g in together if g.stop is None])
    assert _tokens(together) == _tokens(alone)
    # A call per response per step: 11 decode steps and the prompt's last position (A1->A2's two
    # rows differ only there: model.decoding.shared_prefix); the shared prefix is torch's.
    assert len(calls) == 2 * 12


def test_past_max_groups_the_step_runs_in_torch(int8_model: OmniModel, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = int8_model.llm
    graph = llm.decode_graph
    assert graph is not None
    monkeypatch.setattr(graph, "MAX_GROUPS", 1)
    monkeypatch.setattr(graph, "step", lambda *a: pytest.fail("the graph ran past MAX_GROUPS"))
    caches = [_prefilled(llm, rows=1) for _ in range(2)]
    x = torch.randn(2, 1, llm.config.n_embd)
    h = llm.hidden_batched(x, [(c, 12, slice(i, i + 1)) for i, c in enumerate(caches)])
    assert h.shape == (2, 1, llm.config.n_embd) and all(c.length == 13 for c in caches)


def test_a_failed_graph_step_commits_no_cache_and_a_retry_gets_the_same_tokens(
    int8_model: OmniModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = _prompt(int8_model, 30)
    clean = int8_model.start(prompt, max_new_tokens=6, stop_rules=False)
    clean.run()
    gens = [int8_model.start(prompt, max_new_tokens=6, stop_rules=False) for _ in range(2)]
    for _ in range(2):
        step_batch(gens)
    graph = int8_model.llm.decode_graph
    assert graph is not None
    real_step, seen = graph.step, []

    def fail_second(x, cache, start):  # the first response's slot is written, the second fails
        seen.append(start)
        if len(seen) == 2:
            raise RuntimeError("ORT failed")
        return real_step(x, cache, start)

    monkeypatch.setattr(graph, "step", fail_second)
    lengths = [g.cache.length for g in gens]
    with pytest.raises(RuntimeError, match="ORT failed"):
        step_batch(gens)
    monkeypatch.undo()
    assert [g.cache.length for g in gens] == lengths and all(g.steps_done == 2 for g in gens)
    while any(g.stop is None for g in gens):
        step_batch([g for g in gens if g.stop is None])
    assert _tokens(gens) == _tokens([clean, clean])


def test_the_graph_refuses_a_cache_it_cannot_bind(int8_model: OmniModel) -> None:
    llm = int8_model.llm
    graph = llm.decode_graph
    assert graph is not None
    bf16 = llm.new_cache()
    bf16.reserve(0, 4, torch.zeros(2, 4, llm.config.n_embd, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="fp32 cache"):
        graph.step(torch.zeros(2, llm.config.n_embd), bf16, 0)
    with pytest.raises(ValueError, match="fp32 cache"):
        graph.step(torch.zeros(2, llm.config.n_embd), llm.new_cache(), 0)


def test_serve_setting_and_its_thread_budget(tiny_ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    """On by default; OMNIVOX_DECODE_GRAPH / --no-decode-graph turn it off; the graph's ORT pool
    takes the runner's llm thread budget."""
    from omnivox.cli import build_parser
    from server.serve import build_engine
    from server.settings import ServerSettings

    assert ServerSettings().decode_graph is True
    monkeypatch.setenv("OMNIVOX_DECODE_GRAPH", "false")
    assert ServerSettings().decode_graph is False
    monkeypatch.delenv("OMNIVOX_DECODE_GRAPH")
    parser = build_parser()
    assert parser.parse_args(["serve", "--no-decode-graph"]).decode_graph is False
    assert parser.parse_args(["serve"]).decode_graph is None  # then the environment / default decides
    base = {"checkpoint_dir": tiny_ckpt, "dtype": "int8", "interrupt_detector": False, "turn_model": False}
    engine = build_engine(ServerSettings(**base, stage_threads="llm=1"))
    try:
        graph = engine.model.llm.decode_graph
        assert graph is not None and graph.threads == 1
    finally:
        engine.close()
    engine = build_engine(ServerSettings(**base, decode_graph=False))
    try:
        assert engine.model.llm.decode_graph is None
    finally:
        engine.close()


def test_bench_pipeline_runs_the_decode_paths_side_by_side(tiny_ckpt) -> None:
    from benchmarks.pipeline import bench_pipeline

    from .conftest import FIXTURES

    result = bench_pipeline(tiny_ckpt, FIXTURES / "question.wav", dtype="int8", steps=8, levels=(1,),
                            decode_paths=("torch", "graph"))  # fmt: skip
    assert [r["decode_path"] for r in result["levels"]] == ["torch", "graph"]
    assert all(r["first_audio_ms"] is not None for r in result["levels"])
    with pytest.raises(ValueError, match="needs --dtype int8"):
        bench_pipeline(tiny_ckpt, FIXTURES / "question.wav", dtype="float32", steps=8, levels=(1,),
                       decode_paths=("graph",))  # fmt: skip


def test_bench_decode_times_both_paths(tiny_ckpt, tmp_path) -> None:
    import json

    from omnivox.cli import main

    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--checkpoint-dir", str(tiny_ckpt), "--dtype", "int8", "--steps", "4",
                 "--repeats", "1", "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["decode_path"] == "graph" and set(doc["paths"]) == {"graph", "torch"}
    assert doc["step_ms"] == doc["paths"]["graph"]["step_ms"] > 0 and doc["paths"]["torch"]["step_ms"] > 0
