"""The decoding core: stop rules, their order, budget, feedback, row selection, every task."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from model.config import TINY_CONFIG
from model.decoding import Generation, SamplingConfig, sample
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

    def hidden(self, embeds: torch.Tensor, cache, start_pos: int) -> torch.Tensor:
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
        row, text, _ = self._entry(h)
        out = torch.zeros(h.shape[0], LAYOUT.padded_text_vocab_size)
        out[:, text + 1000 * row if text < 100 else text] = 1.0
        return out

    def audio_logits(self, h: torch.Tensor) -> torch.Tensor:
        _, _, audio = self._entry(h)
        out = torch.zeros(7, LAYOUT.padded_audio_vocab_size)
        out[torch.arange(7), torch.tensor(list(audio))] = 1.0
        return out


def _prompt(task: Task, rows: int = 1, length: int = 5) -> Prompt:
    ids = torch.zeros(rows, 8, length, dtype=torch.long)
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
    assert model.llm.backbone.rotary_emb.inv_freq.dtype == torch.float32  # RoPE stays fp32
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


def test_int8_mode_runs_every_audio_task_close_to_fp32(tiny_ckpt, tiny_model: OmniModel, question_audio) -> None:
    from benchmarks.compare import _agreement

    model = OmniModel.load(tiny_ckpt, dtype="int8")
    assert model.llm.is_int8 and model.llm.dtype == torch.bfloat16
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
