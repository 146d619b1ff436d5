"""Checkpoint I/O: lit-gpt key conversion, KV-cache equivalence, errors, hub resolution."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from model.checkpoint import (
    build_llm,
    fuse_qkv,
    litgpt_to_omni,
    omni_to_litgpt,
    resolve_checkpoint,
    split_qkv,
)
from model.config import TINY_CONFIG, ModelConfig
from model.errors import CheckpointError
from model.omni import OmniModel


def test_fused_qkv_order_by_hand() -> None:
    # 4 heads in 2 query groups, head_size 1: per group [q, q, k, v].
    cfg = TINY_CONFIG.replace(n_head=4, n_query_groups=2, head_size=1)
    fused = torch.arange(8.0).reshape(8, 1)
    q, k, v = split_qkv(fused, cfg)
    assert q.flatten().tolist() == [0, 1, 4, 5]
    assert k.flatten().tolist() == [2, 6]
    assert v.flatten().tolist() == [3, 7]
    assert torch.equal(fuse_qkv(q, k, v, cfg), fused)
    bias = torch.arange(8.0)
    assert torch.equal(fuse_qkv(*split_qkv(bias, cfg), cfg), bias)


def test_lit_round_trip_gives_identical_logits(tiny_model: OmniModel) -> None:
    cfg = tiny_model.config
    sd = tiny_model.llm.state_dict()
    lit = omni_to_litgpt(sd, cfg)
    assert "transformer.h.0.attn.attn.weight" in lit and "q_proj" not in "".join(lit)
    qkv_rows = (cfg.n_head + 2 * cfg.n_query_groups) * cfg.head_size
    assert lit["transformer.h.0.attn.attn.weight"].shape == (qkv_rows, cfg.n_embd)
    again = build_llm(cfg, litgpt_to_omni(lit, cfg))
    ids = torch.randint(0, cfg.padded_vocab_size, (2, 8, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        h1 = tiny_model.llm.hidden(tiny_model.llm.embed(ids), tiny_model.llm.new_cache(), 0)
        h2 = again.hidden(again.embed(ids), again.new_cache(), 0)
    assert torch.equal(tiny_model.llm.full_logits(h1), again.full_logits(h2))


def test_kv_cached_steps_equal_one_full_forward(tiny_model: OmniModel) -> None:
    llm = tiny_model.llm
    ids = torch.randint(0, llm.config.padded_vocab_size, (2, 8, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = llm.full_logits(llm.hidden(llm.embed(ids), llm.new_cache(), 0))
        cache = llm.new_cache()
        parts = [llm.hidden(llm.embed(ids[..., :8]), cache, 0)]
        for t in range(8, 12):
            parts.append(llm.hidden(llm.embed(ids[..., t : t + 1]), cache, t))
        stepped = llm.full_logits(torch.cat(parts, dim=1))
    # Same math in another order: agreement to float32 rounding (stated tolerance 1e-4 abs).
    assert torch.allclose(full, stepped, atol=1e-4, rtol=1e-5)
    assert torch.equal(full.argmax(-1), stepped.argmax(-1))
    # New positions after a cached prefix, several at once: a causal mask shifted by the prefix.
    with torch.inference_mode():
        cache = llm.new_cache()
        chunks = [llm.hidden(llm.embed(ids[..., :5]), cache, 0), llm.hidden(llm.embed(ids[..., 5:]), cache, 5)]
    assert torch.allclose(full, llm.full_logits(torch.cat(chunks, dim=1)), atol=1e-4, rtol=1e-5)


def test_logit_slices_equal_the_full_head(tiny_model: OmniModel) -> None:
    llm = tiny_model.llm
    h = torch.randn(3, llm.config.n_embd)
    full = llm.full_logits(h)
    assert torch.allclose(llm.text_logits(h), full[:, :152000], atol=1e-5)
    audio = llm.audio_logits(h)
    assert audio.shape == (3, 7, 4160)
    for i in range(7):
        assert torch.allclose(audio[:, i], full[:, 152000 + 4160 * i : 152000 + 4160 * (i + 1)], atol=1e-5)


def test_tied_embeddings_only_when_configured() -> None:
    cfg = TINY_CONFIG.replace(tie_word_embeddings=True)
    from model.llm import OmniLM

    m = OmniLM(cfg)
    assert m.lm_head.weight is m.backbone.embed_tokens.weight
    lit = omni_to_litgpt(m.state_dict(), cfg)
    del lit["lm_head.weight"]  # a tied checkpoint may omit the head
    rebuilt = build_llm(cfg, litgpt_to_omni(lit, cfg))
    assert rebuilt.lm_head.weight is rebuilt.backbone.embed_tokens.weight
    assert OmniLM(TINY_CONFIG).lm_head.weight is not OmniLM(TINY_CONFIG).backbone.embed_tokens.weight


def test_config_yaml_round_trip(tiny_ckpt: Path) -> None:
    cfg = ModelConfig.from_yaml(tiny_ckpt / "model_config.yaml")
    assert cfg.replace(name=TINY_CONFIG.name) == TINY_CONFIG
    raw = yaml.safe_load((tiny_ckpt / "model_config.yaml").read_text())
    assert raw["padded_vocab_size"] == 181120 and raw["mlp_class_name"] == "LLaMAMLP"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "lit_model.pth").unlink(), "lit_model.pth is missing"),
        (lambda d: (d / "model_config.yaml").unlink(), "model_config.yaml is missing"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda d: (d / "model_config.yaml").write_text("n_layer: [\n"), "not valid YAML"),
        (lambda d: (d / "model_config.yaml").write_text("n_layer: 2\n"), "required key 'n_embd' is missing"),
        (lambda d: (d / "lit_model.pth").write_bytes(b"garbage"), "not a readable torch state dict"),
        (lambda d: (d / "tokenizer.json").write_text("{"), "not a valid tokenizers file"),
        (lambda d: (d / "whisper" / "small.pt").write_bytes(b"x"), "small.pt is not a readable torch file"),
        (lambda d: (d / "snac" / "config.json").write_text("{"), "not a valid SNAC config"),
    ],
)
def test_bad_checkpoint_dirs_name_the_file(tiny_ckpt: Path, tmp_path: Path, breakage, message: str) -> None:
    d = _copy(tiny_ckpt, tmp_path / "ck")
    breakage(d)
    with pytest.raises(CheckpointError, match=message):
        OmniModel.load(d)


def test_missing_weight_is_named(tiny_ckpt: Path, tmp_path: Path) -> None:
    d = _copy(tiny_ckpt, tmp_path / "ck")
    sd = dict(torch.load(d / "lit_model.pth", weights_only=True))
    del sd["transformer.h.1.mlp.fc_2.weight"]
    torch.save(sd, d / "lit_model.pth")
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.1\.mlp\.fc_2\.weight' is missing"):
        OmniModel.load(d)


def test_unsupported_architecture_is_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    d = _copy(tiny_ckpt, tmp_path / "ck")
    raw = yaml.safe_load((d / "model_config.yaml").read_text())
    raw["parallel_residual"] = True
    (d / "model_config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(CheckpointError, match="parallel_residual"):
        OmniModel.load(d)


def test_nonexistent_dir_and_non_hub_id(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint("just-a-name")


def test_hub_id_resolution_uses_the_downloader(tiny_ckpt: Path) -> None:
    calls = []

    def fake_download(repo_id: str) -> str:
        calls.append(repo_id)
        return str(tiny_ckpt)

    assert resolve_checkpoint("gpt-omni/mini-omni", downloader=fake_download) == tiny_ckpt
    assert calls == ["gpt-omni/mini-omni"]

    def offline(repo_id: str) -> str:
        raise OSError("no network")

    with pytest.raises(CheckpointError, match="hub download failed: no network"):
        resolve_checkpoint("gpt-omni/mini-omni", downloader=offline)


def test_hub_id_loads_through_huggingface_hub(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: str(tiny_ckpt))
    m = OmniModel.load("someone/mini-omni", with_whisper=False, with_snac=False)
    assert m.source == str(tiny_ckpt)


def test_whisper_falls_back_to_root_small_pt(tiny_ckpt: Path, tmp_path: Path) -> None:
    d = _copy(tiny_ckpt, tmp_path / "ck")
    (d / "whisper" / "small.pt").rename(d / "small.pt")  # where the Mini-Omni2 release puts it
    m = OmniModel.load(d, with_snac=False)
    assert m.whisper is not None and m.whisper.feature_dim == 64


def test_whisper_falls_back_to_openai_whisper_cache(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _copy(tiny_ckpt, tmp_path / "ck")
    cache = tmp_path / "xdg" / "whisper"
    cache.mkdir(parents=True)
    shutil.move(str(d / "whisper" / "small.pt"), cache / "small.pt")  # openai-whisper's cache file name
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    m = OmniModel.load(d, with_snac=False)
    assert m.whisper is not None
    (cache / "small.pt").unlink()
    import whisper

    def no_network(url: str, root: str, in_memory: bool) -> str:
        raise OSError("network is unreachable")

    monkeypatch.setattr(whisper, "_download", no_network)
    with pytest.raises(CheckpointError, match=r"Whisper weights not found.*network is unreachable"):
        OmniModel.load(d, with_snac=False)


def test_snac_falls_back_to_the_hub_id(tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _copy(tiny_ckpt, tmp_path / "ck")
    shutil.move(str(d / "snac"), tmp_path / "hub_snac")
    import huggingface_hub

    asked = []

    def fake_snapshot(repo_id: str, allow_patterns=None) -> str:
        asked.append(repo_id)
        return str(tmp_path / "hub_snac")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    m = OmniModel.load(d, with_whisper=False)
    assert asked == ["hubertsiuzdak/snac_24khz"] and m.codec is not None

    def offline(repo_id: str, allow_patterns=None) -> str:
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"SNAC weights not in the checkpoint.*offline"):
        OmniModel.load(d, with_whisper=False)


def test_precision_validation() -> None:
    import model.omni as omni
    from model.errors import InputError

    assert omni.resolve_precision("auto", "cpu") == "auto"  # decided by the probe at load
    assert omni.resolve_precision("auto", "cuda:0") == "bfloat16"
    assert omni.resolve_precision("float32", "cuda") == "float32"
    assert omni.resolve_precision(torch.bfloat16, "cpu") == "bfloat16"
    assert omni.resolve_precision("int4", "cpu") == "int4"
    with pytest.raises(InputError, match="dtype must be"):
        omni.resolve_precision("int3", "cpu")
    for quantized in ("int8", "int4"):
        with pytest.raises(InputError, match="CPU mode"):
            omni.resolve_precision(quantized, "cuda")


def test_auto_picks_the_fastest_precision_unless_a_more_exact_one_ties() -> None:
    from model.probe import pick_precision

    assert pick_precision({"float32": 200.0, "bfloat16": 60.0, "int8": 30.0})[0] == "int8"
    # The Intel host of issue 14: bf16 no faster than fp32 -> the exact one of the two.
    choice, reason = pick_precision({"float32": 140.0, "bfloat16": 135.0})
    assert choice == "float32" and "more exact" in reason and "bfloat16 135.0 ms" in reason
    assert pick_precision({"float32": 100.0, "bfloat16": 95.0, "int8": 80.0})[0] == "int8"
    with pytest.raises(ValueError):
        pick_precision({})


def test_auto_on_a_cpu_times_the_candidates_and_loads_its_choice(tiny_ckpt) -> None:
    from model.probe import AUTO_CANDIDATES

    model = OmniModel.load(tiny_ckpt, dtype="auto", with_whisper=False, with_snac=False)
    probe = model.auto_probe
    assert probe is not None and set(probe.ms_per_step) == set(AUTO_CANDIDATES)
    assert all(ms > 0 for ms in probe.ms_per_step.values()) and probe.rounds >= 1
    assert model.precision == probe.choice and probe.seconds < 5
    assert probe.threads == torch.get_num_threads() and probe.layers_timed == model.config.n_layer  # tiny: all fit
    assert OmniModel.load(tiny_ckpt, dtype="float32", with_whisper=False, with_snac=False).auto_probe is None


def test_quantized_load_times_its_prefill_and_encoder_kernels(tiny_ckpt) -> None:
    """int8 loads run the many-row probe and use what it picked: the int8 Linears' prefill
    mode and the encoders' dtype (bf16 only where it measured faster than fp32)."""
    from model.llm import MANY_ROWS_MODES, Int8Linear
    from model.omni import DTYPES
    from model.probe import ENCODER_ORDER, MANY_ROWS_ORDER

    assert set(MANY_ROWS_ORDER) == set(MANY_ROWS_MODES)
    model = OmniModel.load(tiny_ckpt, dtype="int8", decode_graph=False)
    probe = model.many_rows_probe
    assert probe is not None and set(probe.ms) == set(MANY_ROWS_MODES) | set(ENCODER_ORDER)
    assert all(ms > 0 for ms in probe.ms.values()) and probe.rounds >= 1 and probe.seconds < 5
    assert probe.rows >= Int8Linear.DEQUANTIZE_ROWS  # it times the prefill path, not the kernel's few rows
    assert all(m.many_rows == probe.many_rows for m in model.llm.modules() if isinstance(m, Int8Linear))
    assert model.whisper is not None and model.codec is not None
    assert model.whisper.encoder.conv1.weight.dtype == DTYPES[probe.encoder_dtype]
    assert next(model.codec.snac.parameters()).dtype == DTYPES[probe.encoder_dtype]
    # the adapters map a prompt's feature rows: many-row work too, in the dtype timed for it
    assert model.llm.whisper_adapter.fc_1.weight.dtype == DTYPES[probe.encoder_dtype]
    assert model.llm.dtype == torch.bfloat16
    assert f"{probe.many_rows} " in probe.reason and "plain GEMMs float32" in probe.reason
    assert OmniModel.load(tiny_ckpt, dtype="float32", with_whisper=False, with_snac=False).many_rows_probe is None


def test_many_rows_probe_prefers_the_exact_kernel_unless_another_is_clearly_faster() -> None:
    from model.probe import ENCODER_ORDER, MANY_ROWS_ORDER, _pick

    # the 2-core AVX2 EPYC: a bf16 GEMM 5x slower than fp32, the int8 kernel fastest per prefill
    assert _pick({"float32": 27.7, "bfloat16": 122.3}, ENCODER_ORDER)[0] == "float32"
    assert _pick({"gemm-fp32": 45.0, "kernel": 34.0, "gemm-bf16": 92.0}, MANY_ROWS_ORDER)[0] == "kernel"
    # an AVX-512 host with native bf16: bf16 wins only when clearly faster
    assert _pick({"float32": 10.0, "bfloat16": 5.0}, ENCODER_ORDER)[0] == "bfloat16"
    assert _pick({"float32": 10.0, "bfloat16": 9.5}, ENCODER_ORDER)[0] == "float32"
    assert _pick({"gemm-fp32": 10.0, "kernel": 9.8, "gemm-bf16": 9.3}, MANY_ROWS_ORDER)[0] == "gemm-fp32"


# ---------------- transformers: public API only ----------------

MODEL_DIR = Path(__file__).resolve().parent.parent / "model"


def _transformers_private_names() -> set[str]:
    """Single-underscore names on transformers' config and model classes and instances
    (`_attn_implementation`, `_no_split_modules`, ...), less those torch's nn.Module has."""
    import transformers
    from torch import nn

    names: set[str] = set()
    for cfg_cls, model_cls in (
        (transformers.Qwen2Config, transformers.Qwen2Model),
        (transformers.CLIPVisionConfig, transformers.CLIPVisionModel),
    ):
        cfg = cfg_cls(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        for obj in (cfg_cls, cfg, model_cls, model_cls(cfg)):
            names.update(dir(obj))
            names.update(vars(obj))
    torch_names = set(dir(nn.Module)) | set(vars(nn.Module()))
    return {n for n in names if n.startswith("_") and not n.startswith("__")} - torch_names


def _private_transformers_uses(source: str, private: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers":
            if node.module != "transformers":  # internal module layout, e.g. models.qwen2.modeling_qwen2
                found.append(f"{line}: from {node.module} import")
            found += [f"{line}: import {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.startswith("transformers.")]
        elif isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f"{line}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
                arg = node.args[1]
                if isinstance(arg, ast.Constant) and arg.value in private:
                    found.append(f"{line}: {node.func.id}(..., {arg.value!r})")
    return found


def test_model_code_uses_no_private_transformers_api() -> None:
    private = _transformers_private_names()
    assert {"_attn_implementation", "_no_split_modules"} <= private
    # The check catches what it must (the lines this package used to have).
    bad = (
        'config._attn_implementation = "sdpa"\n'
        "from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb\n"
        'getattr(model, "_no_split_modules")\n'
    )
    assert len(_private_transformers_uses(bad, private)) == 3
    found = {
        path.name: uses
        for path in sorted(MODEL_DIR.glob("*.py"))
        if (uses := _private_transformers_uses(path.read_text(encoding="utf-8"), private))
    }
    assert found == {}
    # The LLM is our own block forward: it imports nothing of transformers.
    tree = ast.parse((MODEL_DIR / "llm.py").read_text(encoding="utf-8"))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] == "transformers"]
