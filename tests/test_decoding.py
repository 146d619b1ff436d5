"""The decoding core: stop rules, their order, budget, feedback, row selection, every task."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from model.config import TINY_CONFIG
from model.decoding import Generation, SamplingConfig, sample, step_batch
from model.omni import OmniModel
from model.prompts import Prompt, Task, build_prompt

LAYOUT = TINY_CONFIG.layout
EOT, PAD_T, EOA, PAD_A = LAYOUT.eot, LAYOUT.pad_t, LAYOUT.eoa, LAYOUT.pad_a


class ScriptedLM:
    """Stands in for OmniLM: step s yields script[s] (text, 7 audio) for row 0; row r adds
    1000 * r to the text token, so tests can see which row a token came from."""

    def __init__(self, script: Sequence[tuple[int, Sequence[int]]], block_size: int = 2048) -> None:
        self.script = list(script)
        self.config = TINY_CONFIG.replace(block_size=block_size)
        self.layout = LAYOUT
        self.device = torch.device("cpu")
        self.fed: list[torch.Tensor] = []
        self.calls = 0

    def embed(self, ids: torch.Tensor, splices=()) -> torch.Tensor:
        self.fed.append(ids.clone())
        return torch.zeros(ids.shape[0], ids.shape[-1], 1)

    def new_cache(self) -> None:
        return None

    def hidden_batched(self, embeds: torch.Tensor, groups) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        rows = torch.arange(embeds.shape[0], dtype=torch.float)[:, None, None]
        return torch.full((embeds.shape[0], embeds.shape[1], 1), float(step)) + 1000 * rows

    def _entry(self, h: torch.Tensor) -> tuple[int, int, Sequence[int]]:
        v = int(h.reshape(-1)[0])
        row, step = divmod(v, 1000)
        text, audio = self.script[min(step, len(self.script) - 1)]
        return row, text, audio

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, V): each row's scripted text token."""
        out = torch.zeros(h.shape[0], LAYOUT.padded_text_vocab_size)
        for n in range(h.shape[0]):
            row, text, _ = self._entry(h[n])
            out[n, text + 1000 * row if text < 100 else text] = 1.0
        return out

    def audio_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, 7, V): each row's scripted audio tokens."""
        out = torch.zeros(h.shape[0], 7, LAYOUT.padded_audio_vocab_size)
        for n in range(h.shape[0]):
            _, _, audio = self._entry(h[n])
            out[n, torch.arange(7), torch.tensor(list(audio))] = 1.0
        return out


def _prompt(task: Task, rows: int = 1, length: int = 5) -> Prompt:
    ids = torch.zeros(rows, 8, length, dtype=torch.long)
    ids[:, 0, 0] = torch.arange(rows)  # rows differ from the start: the script counts every forward
    return Prompt(task, ids, (), audio_row=0, text_row=rows - 1)


A = [1, 2, 3, 4, 5, 6, 7]


def test_audio_out_stop_order_and_pad_replacement() -> None:
    script = [
        (EOT, [EOA] * 7),  # prefill: kept whatever it is, no stop check
        (5, A),
        (EOT, A),  # text ends here; the _eot is kept
        (6, A),  # after _eot: replaced by _pad_t
        (7, [EOA, EOA, EOA, EOA, EOA, EOA, 9]),  # _eoa on layers 0..5 never stops
        (8, [1, 1, 1, 1, 1, 1, EOA]),  # layer 6 _eoa: stop, nothing of this step kept
        (9, A),
    ]
    g = Generation(ScriptedLM(script), _prompt(Task.A1A2_SINGLE))  # type: ignore[arg-type]
    outs = list(g)
    r = g.result()
    assert r.stop == "eoa"
    assert r.text_steps == [EOT, 5, EOT, PAD_T, PAD_T]
    assert r.audio_steps.shape == (7, 5)
    assert r.audio_steps[:, 4].tolist() == [EOA] * 6 + [9]
    assert [o.step for o in outs] == [0, 1, 2, 3, 4]
    assert g.step() is None


def test_text_ended_replacement_happens_before_the_eoa_check() -> None:
    # After text ended the text token is _pad_t even on the stopping step; stop is still eoa.
    script = [(5, A), (EOT, A), (EOT, [0, 0, 0, 0, 0, 0, EOA])]
    g = Generation(ScriptedLM(script), _prompt(Task.T1A2))  # type: ignore[arg-type]
    r = g.run()
    assert (r.stop, r.text_steps, r.text_tokens) == ("eoa", [5, EOT], [5])


def test_text_out_stops_on_eot_not_kept_but_prefill_eot_is_kept() -> None:
    script = [(EOT, A), (5, A), (6, A), (EOT, A), (7, A)]
    g = Generation(ScriptedLM(script), _prompt(Task.T1T2))  # type: ignore[arg-type]
    r = g.run()
    assert (r.stop, r.text_steps) == ("eot", [EOT, 5, 6])
    assert r.audio_steps.shape == (7, 0)
    assert r.text_tokens == []  # up to the first _eot


def test_budget_counts_the_prefill_step() -> None:
    script = [(5, A)] * 10
    r = Generation(ScriptedLM(script), _prompt(Task.A1T2), max_new_tokens=3).run()  # type: ignore[arg-type]
    assert (r.stop, r.num_steps) == ("budget", 3)
    # Upstream's window: at most block_size - T kept steps.
    r = Generation(ScriptedLM(script, block_size=9), _prompt(Task.A1T2, length=5)).run()  # type: ignore[arg-type]
    assert (r.stop, r.num_steps) == ("budget", 4)
    with pytest.raises(ValueError, match="does not fit"):
        Generation(ScriptedLM(script, block_size=5), _prompt(Task.A1T2, length=5))  # type: ignore[arg-type]


def test_two_row_batch_reads_text_from_row_1_and_feeds_rows_differently() -> None:
    script = [(5, A), (6, [8, 9, 10, 11, 12, 13, 14]), (EOT, A), (7, [0, 0, 0, 0, 0, 0, EOA])]
    lm = ScriptedLM(script)
    r = Generation(lm, _prompt(Task.A1A2, rows=2)).run()  # type: ignore[arg-type]
    assert r.text_steps == [1005, 1006, EOT]  # row 1's text (the scripted +1000 marks row 1)
    fed = lm.fed[2]  # feedback after step 1
    shifts = [LAYOUT.audio_shift(i) for i in range(7)]
    assert fed[0, :7, 0].tolist() == [a + s for a, s in zip([8, 9, 10, 11, 12, 13, 14], shifts, strict=True)]
    assert fed[1, :7, 0].tolist() == [PAD_A + s for s in shifts]
    assert fed[:, 7, 0].tolist() == [1006, 1006]


def test_text_out_feeds_pad_a_on_every_audio_stream() -> None:
    lm = ScriptedLM([(5, A), (6, A), (EOT, A)])
    Generation(lm, _prompt(Task.A1T1)).run()  # type: ignore[arg-type]
    shifts = [LAYOUT.audio_shift(i) for i in range(7)]
    assert lm.fed[1][0, :7, 0].tolist() == [PAD_A + s for s in shifts]
    assert lm.fed[1][0, 7, 0].tolist() == 5


def test_frames_complete_one_per_step_after_the_delay() -> None:
    script = [(5, [s * 10 + i for i in range(7)]) for s in range(12)]
    g = Generation(ScriptedLM(script), _prompt(Task.T1A2), max_new_tokens=12)  # type: ignore[arg-type]
    outs = list(g)
    assert [o.frame is not None for o in outs] == [False] * 7 + [True] * 5
    streamed = torch.tensor([o.frame for o in outs if o.frame is not None])
    assert torch.equal(streamed, g.result().frames)
    assert streamed[0].tolist() == [10, 21, 32, 43, 54, 65, 76]


def test_sampling_rules() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits, SamplingConfig(), None).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, SamplingConfig(temperature=1.0, top_k=2), g)) for _ in range(50)}
    assert draws == {1, 3}
    draws = {int(sample(logits, SamplingConfig(temperature=1.0, top_k=None, top_p=0.5), g)) for _ in range(50)}
    assert draws <= {1, 3} and 1 in draws
    with pytest.raises(ValueError):
        SamplingConfig(top_p=1.5)


# ---------------- the tiny random checkpoint, every task ----------------

TASKS = [t for t in Task if not t.image_in]  # the image task: tests/test_vision.py (a Mini-Omni2 checkpoint)


def _run(model: OmniModel, task: Task, audio: np.ndarray, sampling: SamplingConfig | None = None):
    prompt = model.prompt(
        task, audio=audio if task.audio_in else None, text=None if task.audio_in else "What is your name?"
    )
    g = model.start(prompt, sampling)
    outs = list(g)
    return g.result(), outs


@pytest.mark.parametrize("task", TASKS, ids=[t.value for t in TASKS])
def test_every_task_is_deterministic_and_ends_by_itself(tiny_model: OmniModel, question_audio, task: Task) -> None:
    r1, outs = _run(tiny_model, task, question_audio)
    r2, _ = _run(tiny_model, task, question_audio)
    assert r1.text_steps == r2.text_steps and torch.equal(r1.audio_steps, r2.audio_steps)
    assert r1.stop == ("eoa" if task.audio_out else "eot")
    assert len(set(r1.text_tokens)) >= 3  # varied, not one token forever
    if task.audio_out:
        frames = r1.frames
        assert 8 <= frames.shape[0] <= 200  # about 0.7 to 17 s of audio
        assert len(set(frames[:, 0].tolist())) >= 5
        streamed = torch.tensor([o.frame for o in outs if o.frame is not None])
        assert torch.equal(streamed, frames)
        audio = tiny_model.decode_frames(frames)
        assert audio.shape == (frames.shape[0] * 2048,) and np.isfinite(audio).all()


def test_two_row_batch_text_equals_a1t2(tiny_model: OmniModel, question_audio) -> None:
    batch, _ = _run(tiny_model, Task.A1A2, question_audio)
    a1t2, _ = _run(tiny_model, Task.A1T2, question_audio)
    n = min(len(batch.text_tokens), len(a1t2.text_tokens))
    assert batch.text_tokens[:n] == a1t2.text_tokens[:n] and n > 0


def test_seeded_sampling_is_reproducible(tiny_model: OmniModel, question_audio) -> None:
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a, _ = _run(tiny_model, Task.A1A2_SINGLE, question_audio, cfg)
    b, _ = _run(tiny_model, Task.A1A2_SINGLE, question_audio, cfg)
    c, _ = _run(tiny_model, Task.A1A2_SINGLE, question_audio, SamplingConfig(temperature=1.0, top_k=50, seed=8))
    assert torch.equal(a.audio_steps, b.audio_steps)
    assert not torch.equal(a.audio_steps[:, : c.audio_steps.shape[1]], c.audio_steps[:, : a.audio_steps.shape[1]])


def _sampled(model: OmniModel, prompt: Prompt, sampling: SamplingConfig) -> tuple[Generation, list[int]]:
    g = model.start(prompt, sampling, max_new_tokens=40, stop_rules=False)
    r = g.run()
    return g, [*r.audio_steps.flatten().tolist(), *r.text_steps]


def test_unseeded_sampling_draws_fresh_randomness(tiny_model: OmniModel, question_audio) -> None:
    # A flat distribution (temperature 2, every id) over 40 steps x 8 tokens: two independent
    # runs agree on all 320 draws with a probability far below 1e-100.
    prompt = tiny_model.prompt(Task.A1A2_SINGLE, audio=question_audio)
    cfg = SamplingConfig(temperature=2.0, top_k=None)
    g1, a = _sampled(tiny_model, prompt, cfg)
    g2, b = _sampled(tiny_model, prompt, cfg)
    assert a != b and g1.seed != g2.seed
    assert g1.generator is not None and g1.generator.device == tiny_model.llm.device
    # The seed an unseeded run drew replays it exactly.
    _, again = _sampled(tiny_model, prompt, SamplingConfig(temperature=2.0, top_k=None, seed=g1.seed))
    assert again == a
    # Greedy needs no generator at all.
    assert tiny_model.start(prompt).generator is None


def test_same_seed_same_tokens(tiny_model: OmniModel, question_audio) -> None:
    prompt = tiny_model.prompt(Task.A1A2, audio=question_audio)
    cfg = SamplingConfig(temperature=2.0, top_k=None, seed=1234)
    g1, a = _sampled(tiny_model, prompt, cfg)
    g2, b = _sampled(tiny_model, prompt, cfg)
    assert a == b and g1.seed == g2.seed == 1234


def test_prompt_too_long_for_the_window(tiny_model: OmniModel) -> None:
    feats = torch.zeros(2046, 64)
    with pytest.raises(ValueError, match="does not fit"):
        tiny_model.start(build_prompt(Task.A1T2, tiny_model.layout, audio_features=feats))


def test_specials_in_frames_never_reach_snac(tiny_model: OmniModel) -> None:
    frames = torch.tensor([[PAD_A, 1, 2, 3, 4, 5, 6], [7, EOA, 4159, 3, 4, 5, 6], [8, 9, 10, 11, 12, 13, 14]])
    audio = tiny_model.decode_frames(frames)
    assert audio.shape == (3 * 2048,) and np.isfinite(audio).all()
    assert tiny_model.decode_frames(torch.zeros((0, 7), dtype=torch.long)).shape == (0,)


def test_bfloat16_runs_every_audio_task(tiny_ckpt, question_audio) -> None:
    model = OmniModel.load(tiny_ckpt, dtype="bfloat16")
    assert model.llm.dtype == torch.bfloat16
    r, _ = _run(model, Task.A1A2, question_audio)
    assert r.stop in ("eoa", "budget") and r.num_steps > 1


def test_int8_linear_splits_off_outlier_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    from model.llm import Int8Linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    w[:, 5] *= 60  # one input channel far larger than the rest (as the random checkpoints' circuit has)
    bias = torch.randn(96, generator=g)
    x = torch.randn(3, 64, generator=g)
    layer = Int8Linear(w, bias)
    assert layer.outlier_cols.tolist() == [5]
    ref = x @ w.T + bias
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == ref.shape
    err = float((out - ref).norm() / ref.norm())
    assert err < 0.01  # int8 weights (~0.8% per row) plus bf16 activations
    # without the decomposition the outlier column sets every row's scale: 3x the error here
    monkeypatch.setattr(Int8Linear, "OUTLIER_RATIO", float("inf"))
    plain = Int8Linear(w, bias)
    assert plain.outlier_cols.numel() == 0
    assert float((plain(x) - ref).norm() / ref.norm()) > 2.5 * err
    assert layer(x[0]).shape == (96,)  # the head is also called on single rows
    many = torch.randn(Int8Linear.DEQUANTIZE_ROWS + 2, 64, generator=g)  # a prefill's rows: the GEMM path
    gemm, gemv = layer(many), torch.cat([layer(many[i : i + 1]) for i in range(many.shape[0])])
    assert float((gemm - gemv).norm() / gemv.norm()) < 0.005  # the same int8 weights, bf16 rounding apart


def test_int8_linear_computes_a_prefill_in_each_many_rows_mode() -> None:
    """Every mode of a prefill's many rows gives the same int8 weights' product, within its
    rounding: fp32 dequantized weights on the unrounded input closest to the exact product."""
    from model.llm import MANY_ROWS_MODES, Int8Linear

    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g)
    w[:, 7] *= 50  # an outlier column, kept out of the int8 matrix
    bias = torch.randn(96, generator=g)
    layer = Int8Linear(w, bias)
    x = torch.randn(Int8Linear.DEQUANTIZE_ROWS + 3, 64, generator=g)
    exact = x @ (layer.dequantized(torch.float32) + _outlier_matrix(layer)).T + bias  # the int8 weights' own product
    errs = {}
    for mode in MANY_ROWS_MODES:
        layer.many_rows = mode
        out = layer(x)
        assert out.dtype == x.dtype and out.shape == exact.shape
        errs[mode] = float((out - exact).norm() / exact.norm())
    assert max(errs.values()) < 0.01, errs  # bf16 activations (and weights) at worst
    assert errs["gemm-fp32"] < min(errs["kernel"], errs["gemm-bf16"]), errs  # only the outlier column rounds
    # a decode step's few rows take the kernel whatever the mode
    layer.many_rows = "gemm-fp32"
    few = x[:2]
    assert torch.equal(layer(few), torch.cat([layer(few[:1]), layer(few[1:])]))
    assert layer.dequantized().dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["gemm-fp32", "gemm-bf16"])
def test_a_prefill_dequantizes_its_weights_a_block_of_rows_at_a_time(mode, monkeypatch) -> None:
    """The GEMM modes dequantize DEQUANTIZE_BLOCK output rows at a time (the block is still in
    cache for its GEMM): the product of the whole matrix at once within float rounding, each
    block's rows being exactly those of the whole dequantized matrix."""
    from model.llm import Int8Linear

    g = torch.Generator().manual_seed(3)
    layer = Int8Linear(torch.randn(100, 64, generator=g), torch.randn(100, generator=g))
    layer.many_rows = mode
    assert torch.equal(layer.dequantized(torch.float32, slice(30, 60)), layer.dequantized(torch.float32)[30:60])
    x = torch.randn(Int8Linear.DEQUANTIZE_ROWS + 5, 64, generator=g)
    whole = layer(x)
    calls = []
    original = Int8Linear.dequantized
    monkeypatch.setattr(Int8Linear, "DEQUANTIZE_BLOCK", 32)  # 100 rows: 32 + 32 + 32 + 4
    monkeypatch.setattr(Int8Linear, "dequantized", lambda self, *a: calls.append(a) or original(self, *a))
    blocked = layer(x)
    assert [rows for _, rows in calls] == [slice(a, a + 32) for a in (0, 32, 64, 96)]
    assert blocked.shape == whole.shape and blocked.dtype == whole.dtype
    # a block's GEMM may take another kernel path (the 4-row tail), so rounding apart
    tol = {"gemm-fp32": 1e-5, "gemm-bf16": 1e-2}[mode]
    torch.testing.assert_close(blocked.float(), whole.float(), rtol=tol, atol=tol)


def _outlier_matrix(layer) -> torch.Tensor:
    full = torch.zeros(layer.out_features, layer.in_features)
    full[:, layer.outlier_cols] = layer.outlier_weight.float()
    return full


def test_quantize_sets_how_every_int8_linear_runs_a_prefill(tiny_ckpt) -> None:
    from model.llm import Int4Linear, Int8Linear

    llm = OmniModel.load(tiny_ckpt, with_whisper=False, with_snac=False).llm
    llm.quantize_("int4", many_rows="gemm-fp32")
    int8s = [m for m in llm.modules() if isinstance(m, Int8Linear)]
    assert int8s and all(m.many_rows == "gemm-fp32" for m in int8s)  # attention and the head's audio slices
    assert all(m.many_rows == "kernel" for m in llm.modules() if isinstance(m, Int4Linear))
    assert llm.whisper_adapter.fc_1.weight.dtype == torch.bfloat16  # the default, as every other weight
    fresh = OmniModel.load(tiny_ckpt, with_whisper=False, with_snac=False).llm
    with pytest.raises(ValueError, match="many_rows must be one of"):
        fresh.quantize_("int8", many_rows="gemm-fp16")
    with pytest.raises(ValueError, match="adapter_dtype must be"):
        fresh.quantize_("int8", adapter_dtype=torch.float16)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_rows_that_hear_one_turn_are_adapted_once_to_the_same_embeddings(tiny_ckpt, adapter_dtype) -> None:
    """A1A2's audio and text rows splice one tensor expanded: adapting it once gives the
    embeddings that adapting each row gives, bit for bit, in either adapter dtype; and an fp32
    adapter under a quantized mode feeds the bf16 stream embeddings."""
    from model.llm import Splice

    llm = OmniModel.load(tiny_ckpt, with_whisper=False, with_snac=False).llm
    fp32_weight = llm.whisper_adapter.fc_1.weight.detach().clone()
    llm.quantize_("int8", adapter_dtype=adapter_dtype)
    # straight from the fp32 weights: an fp32 adapter is not rounded through bf16 on the way
    assert torch.equal(llm.whisper_adapter.fc_1.weight, fp32_weight.to(adapter_dtype))
    assert llm.backbone.embed_tokens.weight.dtype == torch.bfloat16
    feats = torch.randn(37, llm.config.whisper_adapter_dim, generator=torch.Generator().manual_seed(4))
    prompt = build_prompt(Task.A1A2, llm.layout, audio_features=feats)
    (splice,) = prompt.splices
    assert splice.features.stride(0) == 0  # the rows share one tensor
    calls = []
    hook = llm.whisper_adapter.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    shared = llm.embed(prompt.ids, prompt.splices)
    hook.remove()
    assert calls == [1]
    each = llm.embed(prompt.ids, (Splice(splice.start, splice.features.contiguous()),))
    assert shared.dtype == torch.bfloat16 and torch.equal(shared, each)
    assert torch.equal(shared[0, splice.start : splice.start + 37], shared[1, splice.start : splice.start + 37])


def test_ort_int8_linear_for_the_head_text_slice() -> None:
    """ONNX Runtime's MatMulNBits (int8 weights per 32 inputs, int8 activations per block)
    against fp32, with an outlier column kept in bf16 as in the torch kinds."""
    from model.llm import Int8Linear, OrtInt8Linear

    g = torch.Generator().manual_seed(2)
    w = torch.randn(640, 64, generator=g) * 0.02
    w[:, 3] *= 60
    layer = OrtInt8Linear(w, None)
    assert layer.outlier_cols.tolist() == [3]
    for rows in (1, 2, OrtInt8Linear.DEQUANTIZE_ROWS + 1):
        x = torch.randn(rows, 64, generator=g)
        ref = x @ w.T
        out = layer(x)
        assert out.dtype == x.dtype and out.shape == ref.shape
        err = float((out - ref).norm() / ref.norm())
        assert err < 0.02, (rows, err)
        assert err < 2 * float((Int8Linear(w, None)(x) - ref).norm() / ref.norm()) + 0.005
    assert layer(torch.randn(64, generator=g)).shape == (640,)
    with pytest.raises(ValueError, match="MatMulNBits needs"):
        OrtInt8Linear(torch.randn(64, 48), None)


def test_int4_linear_holds_weights_on_its_grid_exactly() -> None:
    """Weights already on a 4-bit grid ((u - zero) * scale, a bf16 scale and an integer zero
    point per group) come back bit for bit, packed two a byte as MatMulNBits reads them (the
    decode graph's test checks that layout against ORT); torch's kernel, whose offset
    (8 - zero) * scale is rounded to bf16, computes them within bf16 rounding."""
    from model.llm import Int4Linear

    g = torch.Generator().manual_seed(0)
    n, k, group = 128, 64, Int4Linear.GROUP
    u = torch.randint(0, 16, (n, k), generator=g)
    u[:, 0::group], u[:, 1::group] = 0, 15  # every group spans the whole grid ...
    zero = torch.randint(0, 16, (n, k // group), generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.01 + 0.001).to(torch.bfloat16).float()
    w = ((u.reshape(n, k // group, group) - zero[..., None]) * scale[..., None]).reshape(n, k)  # ... and holds 0
    layer = Int4Linear(w, None)
    assert layer.outlier_cols.numel() == 0
    assert torch.equal(layer.zeros, zero.to(torch.uint8)) and torch.equal(layer.group_scales, scale)
    assert torch.equal(layer.unpacked(), u.to(torch.uint8))
    assert torch.equal(layer.weight_u4[:, 0], (u[:, 0] | (u[:, 1] << 4)).to(torch.uint8))  # even input low
    assert torch.equal(layer.dequantized(torch.float32), w)
    assert torch.equal(layer.dequantized(torch.float32, slice(40, 90)), w[40:90])  # a prefill's block of rows
    x = torch.randn(3, k, generator=g).to(torch.bfloat16)
    ref = x.float() @ w.T
    out = layer(x).float()
    assert float((out - ref).norm() / ref.norm()) < 0.01  # bf16 rounding only
    many = torch.randn(Int4Linear.DEQUANTIZE_ROWS + 2, k, generator=g)  # a prefill's rows
    gemm, gemv = layer(many), torch.cat([layer(many[i : i + 1]) for i in range(many.shape[0])])
    assert float((gemm - gemv).norm() / gemv.norm()) < 0.005


def test_int4_linear_error_against_int8() -> None:
    from model.llm import Int4Linear, Int8Linear

    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g) * 0.02
    w[:, 7] *= 60
    bias = torch.randn(96, generator=g)
    layer = Int4Linear(w, bias)
    assert layer.outlier_cols.tolist() == [7]
    x = torch.randn(Int4Linear.DEQUANTIZE_ROWS + 1, 64, generator=g)
    ref = x @ w.T + bias
    err = float((layer(x) - ref).norm() / (x @ w.T).norm())
    err_int8 = float((Int8Linear(w, bias)(x) - ref).norm() / (x @ w.T).norm())
    assert 2 * err_int8 < err < 0.03, (err, err_int8)  # 4-bit weights, the kernel on every row
    assert layer(x[0]).shape == (96,)
    with pytest.raises(ValueError, match="int4 needs"):
        Int4Linear(torch.randn(96, 48), None)


def test_int4_mode_runs_every_audio_task_near_fp32(tiny_ckpt, tiny_model: OmniModel, question_audio) -> None:
    from benchmarks.compare import _agreement
    from model.llm import Int4Linear, Int8Linear

    model = OmniModel.load(tiny_ckpt, dtype="int4")
    assert model.precision == "int4" and model.llm.dtype == torch.bfloat16
    r, _ = _run(model, Task.A1A2, question_audio)
    assert r.stop in ("eoa", "budget") and r.num_steps > 1
    prompt = tiny_model.prompt(Task.A1A2, audio=question_audio)
    ref = tiny_model.start(prompt, max_new_tokens=24, stop_rules=False).run()
    agree = _agreement(tiny_model.llm, model.llm, prompt, [*ref.audio_steps.tolist(), ref.text_steps])
    # measured 82% / 100% on the tiny checkpoint (int8: 96% / 100%)
    assert agree["text_top1_match"] >= 0.85 and agree["audio_top1_match"] >= 0.7, agree
    mlp, attn = model.llm.backbone.decoder_layers()[0].mlp, model.llm.backbone.decoder_layers()[0].self_attn
    assert isinstance(mlp.up_proj, Int4Linear) and isinstance(attn.q_proj, Int8Linear)  # 4-bit MLPs only


def test_int8_mode_runs_every_audio_task_close_to_fp32(tiny_ckpt, tiny_model: OmniModel, question_audio) -> None:
    from benchmarks.compare import _agreement

    model = OmniModel.load(tiny_ckpt, dtype="int8")
    assert model.llm.quantized == "int8" and model.precision == "int8" and model.llm.dtype == torch.bfloat16
    from model.llm import OrtInt8Linear, QuantHead

    assert isinstance(model.llm.lm_head, QuantHead) and isinstance(model.llm.lm_head.text, OrtInt8Linear)
    r, _ = _run(model, Task.A1A2, question_audio)
    assert r.stop in ("eoa", "budget") and r.num_steps > 1
    prompt = tiny_model.prompt(Task.A1A2, audio=question_audio)
    ref = tiny_model.start(prompt, max_new_tokens=24, stop_rules=False).run()
    tokens = [*ref.audio_steps.tolist(), ref.text_steps]
    agree = _agreement(tiny_model.llm, model.llm, prompt, tokens)
    assert agree["text_top1_match"] >= 0.9 and agree["audio_top1_match"] >= 0.8, agree


def test_core_matches_the_naive_upstream_style_loop(tiny_model: OmniModel, question_audio) -> None:
    """The exact optimizations (logit slices, no text after _eot, tensor feedback) change no token."""
    from benchmarks.naive import naive_a1a2

    prompt = tiny_model.prompt(Task.A1A2, audio=question_audio)
    naive = naive_a1a2(tiny_model.llm, prompt, 40)
    r = tiny_model.start(prompt, max_new_tokens=40, stop_rules=False).run()
    assert [*r.audio_steps.tolist(), r.text_steps] == naive


def _step_together(model: OmniModel, gens: list) -> None:
    """Decode several generations in one batched forward per step (as the runner does)."""
    for g in gens:
        g.step()  # prefills run alone: their lengths differ
    while True:
        live = [(g, nxt) for g in gens if (nxt := g.begin_step()) is not None]
        if not live:
            return
        groups, row = [], 0
        for g, (embeds, pos) in live:
            groups.append((g.cache, pos, slice(row, row + embeds.shape[0])))
            row += embeds.shape[0]
        h = model.llm.hidden_step_batched(torch.cat([e for _, (e, _) in live]), groups)
        for (g, _), (_, _, rows) in zip(live, groups, strict=True):
            g.finish_step(h[rows])


def test_batched_decode_equals_separate_decoding(tiny_model: OmniModel, question_audio) -> None:
    prompts = [
        tiny_model.prompt(Task.A1A2, audio=question_audio),  # two rows
        tiny_model.prompt(Task.T1A2, text="Hello there, how are you?"),
        tiny_model.prompt(Task.A1T1, audio=question_audio[:8000]),
    ]
    alone = [tiny_model.start(p, max_new_tokens=30).run() for p in prompts]
    together = [tiny_model.start(p, max_new_tokens=30) for p in prompts]
    _step_together(tiny_model, together)
    for a, g in zip(alone, together, strict=True):
        b = g.result()
        assert a.stop == b.stop and a.text_steps == b.text_steps and torch.equal(a.audio_steps, b.audio_steps)


def test_batched_hidden_states_match_the_model(tiny_model: OmniModel) -> None:
    llm = tiny_model.llm
    ids = torch.randint(0, llm.config.padded_vocab_size, (3, 8, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = llm.hidden(llm.embed(ids), llm.new_cache(), 0)[:, -1]
        caches = [llm.new_cache(), llm.new_cache()]
        llm.hidden(llm.embed(ids[:2, :, :5]), caches[0], 0)
        llm.hidden(llm.embed(ids[2:, :, :5]), caches[1], 0)
        h = llm.hidden_step_batched(
            llm.embed(ids[:, :, 5:]), [(caches[0], 5, slice(0, 2)), (caches[1], 5, slice(2, 3))]
        )
    assert torch.allclose(h, ref, atol=1e-4)


def test_step_batch_equals_separate_decoding(tiny_model: OmniModel, question_audio) -> None:
    """Prefills and decode steps of several responses through step_batch: one forward per step
    length, the tokens of each response run alone (greedy and seeded sampling)."""
    cfgs = [None, SamplingConfig(temperature=1.0, top_k=50, seed=3), None, None]
    prompts = [
        tiny_model.prompt(Task.A1A2, audio=question_audio),
        tiny_model.prompt(Task.A1A2_SINGLE, audio=question_audio),
        tiny_model.prompt(Task.T1A2, text="Hello there, how are you?"),
        tiny_model.prompt(Task.T1T2, text="Hello there, how are you?"),  # the same length as T1A2
    ]
    assert prompts[2].length == prompts[3].length  # their prefills share one forward
    alone = [tiny_model.start(p, c, max_new_tokens=30).run() for p, c in zip(prompts, cfgs, strict=True)]
    gens = [tiny_model.start(p, c, max_new_tokens=30) for p, c in zip(prompts, cfgs, strict=True)]
    while not all(g.done for g in gens):
        step_batch(gens)
    for a, g in zip(alone, gens, strict=True):
        b = g.result()
        assert a.stop == b.stop and a.text_steps == b.text_steps and torch.equal(a.audio_steps, b.audio_steps)
    with pytest.raises(ValueError, match="twice"):
        step_batch([gens[0], gens[0]])


@pytest.mark.parametrize("task", [Task.A1A2, Task.A1A2_SINGLE])
@pytest.mark.parametrize("chunk", [1, 7, 16, 40])
def test_prefill_in_parts_gives_the_tokens_of_one_prefill(
    tiny_model: OmniModel, question_audio, chunk: int, task: Task
) -> None:
    """prefill_part's parts (equal, at most `chunk` positions; one ends where A1->A2's rows
    start to differ), interleaved with another response's decode steps, then the last part
    with sampling: the tokens of one prefill."""
    prompt = tiny_model.prompt(task, audio=question_audio)
    other_prompt = tiny_model.prompt(Task.T1A2, text="What is your name?")
    ref = tiny_model.start(prompt, max_new_tokens=20, stop_rules=False).run()
    other_ref = tiny_model.start(other_prompt, max_new_tokens=40, stop_rules=False).run()
    g = tiny_model.start(prompt, max_new_tokens=20, stop_rules=False)
    other = tiny_model.start(other_prompt, max_new_tokens=40, stop_rules=False)
    other.step()
    sizes = []
    while g.in_prefill:
        before = g.prefilled
        if not g.prefill_part(chunk):
            break
        sizes.append(g.prefilled - before)
        assert g.steps_done == 0 and not g.text_steps
        step_batch([other])  # the other answer steps between the parts
    assert g.prefill_left <= chunk and g.prefilled == sum(sizes)
    assert g.shared_prefix == (prompt.length - 1 if task is Task.A1A2 else 0)
    if sizes and not g.shared_prefix:  # equal parts: none much smaller than another
        assert max(sizes) <= chunk and max(sizes) - min(sizes) <= 1 and max(sizes) - g.prefill_left <= 1
    ends = list(itertools.accumulate(sizes))
    assert all(not a < g.shared_prefix < b for a, b in zip([0, *ends[:-1]], ends, strict=True))  # none straddles it
    while not (g.done and other.done):
        step_batch([x for x in (g, other) if not x.done])
    assert g.prefill_left == 0 and g.prefilled == prompt.length
    for a, b in ((ref, g.result()), (other_ref, other.result())):
        assert a.text_steps == b.text_steps and torch.equal(a.audio_steps, b.audio_steps)
    with pytest.raises(ValueError, match="max_positions"):
        g.prefill_part(0)
    assert not g.prefill_part(4)  # prefilled: nothing to do


def test_a_shared_prompt_prefix_is_prefilled_once(
    tiny_model: OmniModel, tiny2_model: OmniModel, question_audio
) -> None:
    """A1->A2's (and Mini-Omni2's image task's) two rows differ only in their last position:
    that prefix is prefilled through one row and copied; the tokens are those of prefilling
    both rows (greedy and seeded sampling)."""
    from model.decoding import shared_prefix
    from model.vision import open_image_file

    from .conftest import FIXTURES

    image = open_image_file(FIXTURES / "picture.png")
    prompts = [
        (tiny_model, tiny_model.prompt(Task.A1A2, audio=question_audio)),
        (tiny2_model, tiny2_model.prompt(Task.IMAGE_A1A2, audio=question_audio, image=image)),
    ]
    for model, prompt in prompts:
        assert shared_prefix(prompt) == prompt.length - 1
        for cfg in (None, SamplingConfig(temperature=1.0, top_k=50, seed=4)):
            runs = []
            for share in (True, False):
                g = model.start(prompt, cfg, max_new_tokens=20, stop_rules=False)
                if not share:
                    g.shared_prefix = 0
                r = g.run()
                assert g.cache.k is not None and g.cache.k.shape[1] == 2  # both rows go on
                runs.append(r)
            assert runs[0].text_steps == runs[1].text_steps and torch.equal(runs[0].audio_steps, runs[1].audio_steps)
    one_row = tiny_model.prompt(Task.A1A2_SINGLE, audio=question_audio)
    text = tiny_model.prompt(Task.T1A2, text="Hello there")
    assert shared_prefix(one_row) == shared_prefix(text) == 0


class _Trigger:
    """Raises once, on the (skip + 1)-th call after `arm(skip)`."""

    def __init__(self) -> None:
        self.left: int | None = None
        self.fired = 0

    def arm(self, skip: int) -> None:
        self.left = skip

    def __call__(self) -> None:
        if self.left is None:
            return
        if self.left == 0:
            self.left = None
            self.fired += 1
            raise RuntimeError("injected failure")
        self.left -= 1


def _snapshot(g: Generation) -> tuple:
    rng = g.generator.get_state() if g.generator is not None else None
    return g.steps_done, g.cache.length, list(g.text_steps), len(g.audio_steps), g.text_ended, g.stop, rng


@pytest.mark.parametrize("where", ["forward", "sampling"])
def test_failed_batched_step_retried_alone_gives_uninterrupted_tokens(
    tiny_model: OmniModel, question_audio, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A batched step that raises mid-forward (in the last layer's MLP, after every layer wrote
    its KV) or mid-sampling (the third response's first draw, after the others drew from their
    generators) changes no response; retrying each alone, then batching on, gives the tokens
    of an uninterrupted run."""
    llm = tiny_model.llm
    trigger = _Trigger()
    if where == "forward":
        mlp = llm.backbone.decoder_layers()[-1].mlp
        mlp_forward = mlp.forward
        monkeypatch.setattr(mlp, "forward", lambda x: (trigger(), mlp_forward(x))[1])
    else:
        import model.decoding as decoding

        real_sample = decoding.sample
        monkeypatch.setattr(decoding, "sample", lambda *a: (trigger(), real_sample(*a))[1])
    cfgs = [
        None,
        SamplingConfig(temperature=1.0, top_k=50, seed=5),
        SamplingConfig(temperature=0.8, top_k=None, seed=9),
    ]
    prompts = [
        tiny_model.prompt(Task.A1A2, audio=question_audio),
        tiny_model.prompt(Task.A1A2_SINGLE, audio=question_audio),
        tiny_model.prompt(Task.T1A2, text="What is your name?"),
    ]
    runs = list(zip(prompts, cfgs, strict=True))
    ref = [tiny_model.start(p, c, max_new_tokens=24, stop_rules=False).run() for p, c in runs]
    gens = [tiny_model.start(p, c, max_new_tokens=24, stop_rules=False) for p, c in runs]
    for g in gens:
        g.step()  # prefills
    for step in range(1, 24):
        if step in (3, 10):
            before = [_snapshot(g) for g in gens]
            trigger.arm(0 if where == "forward" else 4)  # 4: two draws (audio, text) of two responses
            with pytest.raises(RuntimeError, match="injected"):
                step_batch(gens)
            for g, b in zip(gens, before, strict=True):
                now = _snapshot(g)
                assert now[0] == b[0] and now[2:6] == b[2:6]  # the Generation as before
                # A failed forward commits no cache; after a completed forward the cache holds
                # the step's keys (the retry rewrites them in place at the same position).
                assert now[1] == (b[1] if where == "forward" else b[1] + 1)
                assert (now[6] is None) == (b[6] is None) and (now[6] is None or torch.equal(now[6], b[6]))
            for g in gens:  # the runner's fallback: each response alone
                g.step()
        else:
            step_batch(gens)
    assert trigger.fired == 2
    for a, g in zip(ref, gens, strict=True):
        b = g.result()
        assert a.stop == b.stop == "budget"
        assert a.text_steps == b.text_steps and torch.equal(a.audio_steps, b.audio_steps)


def test_begin_step_changes_nothing(tiny_model: OmniModel) -> None:
    g = tiny_model.start(tiny_model.prompt(Task.T1A2, text="Hi there"), max_new_tokens=3)
    for _ in range(3):
        a, b = g.begin_step(), g.begin_step()
        assert a is not None and b is not None and a[1] == b[1] and torch.equal(a[0], b[0])
        g.step()
    assert g.stop == "budget" and g.begin_step() is None and g.step() is None


def test_kv_cache_writes_are_positional_and_commit_on_success(tiny_model: OmniModel) -> None:
    llm = tiny_model.llm
    ids = torch.randint(0, llm.config.padded_vocab_size, (1, 8, 12), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        emb = llm.embed(ids)
        cache = llm.new_cache()
        llm.hidden(emb[:, :10], cache, 0)
        assert cache.length == 10
        with pytest.raises(ValueError, match="only 10 positions"):
            llm.hidden(emb[:, 11:12], cache, 11)  # a hole
        h1 = llm.hidden(emb[:, 10:11], cache, 10)
        h1_again = llm.hidden(emb[:, 10:11], cache, 10)  # redone at the same place: same result
        assert torch.equal(h1, h1_again) and cache.length == 11
        # a later position after a rewind overwrites instead of appending
        llm.hidden(emb[:, 11:12], cache, 9)
        assert cache.length == 10
        # growth keeps the valid prefix
        cache.GROW = 4
        big = llm.new_cache()
        big.GROW = 4
        parts = [llm.hidden(emb[:, :3], big, 0)] + [llm.hidden(emb[:, t : t + 1], big, t) for t in range(3, 12)]
        assert big.capacity >= 12
        full = llm.hidden(emb, llm.new_cache(), 0)
        assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_and_batched_decode(tiny_ckpt, question_audio) -> None:
    model = OmniModel.load(tiny_ckpt, device="cuda", with_whisper=False, with_snac=False)
    feats = torch.randn(40, model.config.whisper_adapter_dim, generator=torch.Generator().manual_seed(0))
    prompts = [build_prompt(t, model.layout, audio_features=feats) for t in (Task.A1A2, Task.A1A2_SINGLE)]
    cfg = SamplingConfig(temperature=1.0, top_k=None, seed=11)
    gens = [model.start(p, cfg, max_new_tokens=16, stop_rules=False) for p in prompts]
    assert all(g.generator is not None and g.generator.device.type == "cuda" for g in gens)
    while not all(g.done for g in gens):
        step_batch(gens)
    again = model.start(prompts[0], cfg, max_new_tokens=16, stop_rules=False).run()
    assert gens[0].result().text_steps == again.text_steps
