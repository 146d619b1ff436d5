"""The quantized (int8, int4) decode step as one ONNX Runtime graph (model.decode_graph)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.decoding import SamplingConfig, step_batch
from model.llm import Int4Linear, Int8Linear, KVArena, KVCache, OmniLM
from model.omni import OmniModel
from model.prompts import Task, build_prompt


@pytest.fixture(scope="module")
def int8_model(tiny_ckpt) -> OmniModel:
    return OmniModel.load(tiny_ckpt, dtype="int8", with_whisper=False, with_snac=False)


@pytest.fixture(scope="module")
def int4_model(tiny_ckpt) -> OmniModel:
    return OmniModel.load(tiny_ckpt, dtype="int4", with_whisper=False, with_snac=False)


def _dequantized_fp32(llm: OmniLM) -> OmniLM:
    """The quantized model's own weights (int8 rows times scales, or 4-bit groups with their
    zero points and scales; outlier columns, bf16 biases and norms) in an fp32 model without
    the graph: what the graph computes, in exact arithmetic."""
    ref = copy.deepcopy(llm.backbone)
    for layer in ref.decoder_layers():
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Int8Linear | Int4Linear):
                    w = child.dequantized(torch.float32)  # not rounded to bf16
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


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_graph_step_is_the_quantized_models_forward(tiny_ckpt, precision: str) -> None:
    """With fp32 activations (accuracy level 0) the graph equals the torch forward over the
    same dequantized weights, hidden states and the KV it writes in place: the fused q/k/v and
    gate/up (int8 rows, or int4's packed groups and zero points), the outlier columns, biases,
    norms, RoPE and the cached prefix all wired right."""
    llm = OmniModel.load(tiny_ckpt, dtype="float32", with_whisper=False, with_snac=False).llm
    first, second = llm.backbone.decoder_layers()
    with torch.no_grad():  # an outlier column in an MLP too
        first.mlp.down_proj.weight[:, 5] *= 20
    llm.quantize_(precision)
    assert isinstance(first.mlp.down_proj, Int4Linear if precision == "int4" else Int8Linear)
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


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_graph_with_int8_activations_stays_near_the_torch_step(
    precision: str, int8_model: OmniModel, int4_model: OmniModel
) -> None:
    """The default (int8 activations per block of 32, VNNI) against torch's int8 (int4)
    kernels on the same weights (bf16 activations): two roundings of one model."""
    llm = (int8_model if precision == "int8" else int4_model).llm
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


def test_load_attaches_the_graph_to_the_quantized_modes_on_cpu_only(
    tiny_ckpt, int8_model: OmniModel, int4_model: OmniModel
) -> None:
    assert int8_model.llm.decode_graph is not None and int4_model.llm.decode_graph is not None
    plain = OmniModel.load(tiny_ckpt, dtype="int4", with_whisper=False, with_snac=False, decode_graph=False)
    assert plain.llm.decode_graph is None
    fp32 = OmniModel.load(tiny_ckpt, dtype="float32", with_whisper=False, with_snac=False)
    with pytest.raises(ValueError, match=r"quantized \(int8 or int4\) model on a CPU"):
        fp32.llm.attach_decode_graph()


def _tokens(gens) -> list:
    return [[g.result().text_steps, g.result().audio_steps.tolist()] for g in gens]


def _prompt(model: OmniModel, frames: int, seed: int = 1):
    feats = torch.randn(frames, model.config.whisper_adapter_dim, generator=torch.Generator().manual_seed(seed))
    return build_prompt(Task.A1A2, model.layout, audio_features=feats)


def _solo_and_fresh(model: OmniModel, prompts, budgets, seed: int):
    """Each prompt's generation run alone to its end, and fresh ones of the same to batch."""
    sampling = SamplingConfig(temperature=0.9, top_k=50, seed=seed)

    def start():
        return [
            model.start(p, sampling, max_new_tokens=n, stop_rules=False) for p, n in zip(prompts, budgets, strict=True)
        ]

    alone = start()
    for g in alone:
        g.run()
    return alone, start()


def _step_to_end(gens) -> None:
    while any(g.stop is None for g in gens):
        step_batch([g for g in gens if g.stop is None])


def _count_calls(graph, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of every graph call from now on."""
    calls: list[int] = []
    real_run = graph._run
    monkeypatch.setattr(graph, "_run", lambda x, *a: calls.append(x.shape[0]) or real_run(x, *a))
    return calls


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_responses_stepped_together_get_their_solo_tokens_from_one_call(
    precision: str, int8_model: OmniModel, int4_model: OmniModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row is computed on its own in the graph (4-bit MatMulNBits too), so one call for
    two responses gives each the tokens it gets alone (a batched torch step would round them
    differently)."""
    model = int8_model if precision == "int8" else int4_model
    prompts = [_prompt(model, 20), _prompt(model, 27, seed=2)]
    alone, together = _solo_and_fresh(model, prompts, [12, 12], seed=3)
    graph = model.llm.decode_graph
    assert graph is not None
    calls = _count_calls(graph, monkeypatch)
    _step_to_end(together)
    assert _tokens(together) == _tokens(alone)
    # One call of 4 rows a step: 11 decode steps and the prompt's last position (A1->A2's two
    # rows differ only there: model.decoding.shared_prefix); the shared prefix is torch's.
    assert calls == [4] * 12
    assert [cache for cache, _ in graph.arena.members()] == [g.cache for g in together]


def test_a_response_that_skips_steps_rides_along_and_keeps_its_tokens(
    int8_model: OmniModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three responses in the arena; the middle one waits some steps (a runner holds a response
    whose audio is far enough ahead) while the others step in one call over its rows too, and
    one ends early: every response still gets its solo tokens, each step one call."""
    prompts = [_prompt(int8_model, 20 + 3 * i, seed=i) for i in range(3)]
    alone, gens = _solo_and_fresh(int8_model, prompts, [12, 12, 6], seed=5)
    graph = int8_model.llm.decode_graph
    assert graph is not None
    calls = _count_calls(graph, monkeypatch)
    for _ in range(3):
        step_batch(gens)
    for _ in range(3):  # the middle one waits: it rides along in rows 2-3 of 6
        step_batch([gens[0], gens[2]])
    assert calls[-3:] == [6] * 3 and gens[1].steps_done == 3
    _step_to_end(gens)
    assert _tokens(gens) == _tokens(alone)
    ended = gens.pop()  # its cache freed: the next call over the arena leaves its rows out
    del ended
    assert None in [cache for cache, _ in graph.arena.members()]
    more = [int8_model.start(prompts[2], SamplingConfig(seed=5), max_new_tokens=2, stop_rules=False) for _ in range(2)]
    calls.clear()
    for _ in range(2):
        step_batch(more)
    assert calls == [4, 4] and [c for c, _ in graph.arena.members()][-2:] == [g.cache for g in more]
    assert all(c is not None for c, _ in graph.arena.members())


def test_the_arena_keeps_every_members_prefix_when_it_moves_grows_or_frees() -> None:
    def filled(rows: int, length: int, seed: int) -> KVCache:
        cache = KVCache(2, 1, 4, 1024)
        x = torch.randn(rows, 1, length, 4, generator=torch.Generator().manual_seed(seed))
        cache.reserve(0, length, torch.zeros(rows, length, 8))
        for layer in range(2):
            cache.write(layer, 0, x + layer, -x)
        cache.length = length
        return cache

    def prefix(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        assert cache.k is not None and cache.v is not None
        return cache.k[..., : cache.length, :].clone(), cache.v[..., : cache.length, :].clone()

    arena = KVArena(2, 1, 4, 1024)
    a, b, c = filled(2, 10, 0), filled(1, 300, 1), filled(2, 5, 2)
    want = {id(x): prefix(x) for x in (a, b, c)}
    arena.admit([a, b], 11)
    assert arena.capacity == 512 and [r for _, r in arena.members()] == [slice(0, 2), slice(2, 3)]
    assert a.arena is arena and a.k is not None and a.k.data_ptr() == arena.k.data_ptr()  # a view
    b.reserve(300, 600, torch.zeros(1, 300, 8))  # a member grows: the arena grows for all
    assert arena.capacity == 1024 and a.capacity == b.capacity == 1024
    del a
    arena.admit([c], 6)  # a's rows go back, b moves down, c joins after it
    assert [r for _, r in arena.members()] == [slice(0, 1), slice(1, 3)]
    for x in (b, c):
        got = prefix(x)
        assert torch.equal(got[0], want[id(x)][0]) and torch.equal(got[1], want[id(x)][1])
    with pytest.raises(ValueError, match="one dtype"):
        arena.admit([_bf16(filled(1, 3, 4))], 4)
    del b, c, x, got
    arena.release_freed()
    assert arena.k is None and arena.members() == []


def _bf16(cache: KVCache) -> KVCache:
    assert cache.k is not None and cache.v is not None
    cache.k, cache.v = cache.k.bfloat16(), cache.v.bfloat16()
    return cache


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
    real_run = graph._run

    def fail_after_writing(*args):  # the call wrote every row's slot, then failed
        real_run(*args)
        raise RuntimeError("ORT failed")

    monkeypatch.setattr(graph, "_run", fail_after_writing)
    lengths = [g.cache.length for g in gens]
    with pytest.raises(RuntimeError, match="ORT failed"):
        step_batch(gens)
    monkeypatch.undo()
    assert [g.cache.length for g in gens] == lengths and all(g.steps_done == 2 for g in gens)
    step_batch(gens[1:])  # a retry alone, then together again
    _step_to_end(gens)
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

    result = bench_pipeline(tiny_ckpt, FIXTURES / "question.wav", dtype="int8", steps=8, levels=(2,),
                            decode_paths=("torch", "graph", "graph-each"))  # fmt: skip
    assert [r["decode_path"] for r in result["levels"]] == ["torch", "graph", "graph-each"]
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
    # Two responses stepped together: one call for both, a call each, and torch's batched step.
    assert main(["bench", "decode", "--checkpoint-dir", str(tiny_ckpt), "--dtype", "int8", "--steps", "4",
                 "--repeats", "1", "--responses", "2", "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["responses"] == 2 and set(doc["paths"]) == {"graph", "graph-each", "torch"}
    assert doc["step_ms"] == doc["paths"]["graph"]["step_ms"] > 0 and doc["paths"]["torch"]["step_ms"] > 0
