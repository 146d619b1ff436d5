"""`omnivox generate` / `make-checkpoint` end to end, input handling and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model.audio import feature_frames, load_audio_file
from model.errors import InputError
from model.make_checkpoint import make_checkpoint
from omnivox.cli import main

from .conftest import FIXTURES


@pytest.mark.parametrize("task", ["a1a2", "a1a2-single", "a1t2", "a1t1"])
def test_generate_audio_tasks(tiny_ckpt: Path, tmp_path: Path, task: str, capsys) -> None:
    out_json, out_wav = tmp_path / "t.json", tmp_path / "a.wav"
    rc = main(["generate", "--checkpoint-dir", str(tiny_ckpt), "--task", task,
               "--input-wav", str(FIXTURES / "question.wav"),
               "--output-wav", str(out_wav), "--tokens-json", str(out_json)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out_json.read_text())
    assert doc["task"] == task
    assert set(doc) >= {"text", "text_tokens", "audio_tokens", "num_frames", "num_steps", "stop", "timings"}
    assert set(doc["timings"]) == {"load_s", "encode_ms", "prefill_ms", "decode_steps", "steps_per_s", "first_frame_ms"}
    assert 151936 not in doc["text_tokens"]
    assert f"text: {doc['text']}" in capsys.readouterr().out
    if task in ("a1a2", "a1a2-single"):
        assert doc["stop"] == "eoa"
        assert len(doc["audio_tokens"]) == 7 and all(len(layer) == doc["num_frames"] for layer in doc["audio_tokens"])
        assert doc["num_frames"] == doc["num_steps"] - 7
        pcm, rate = sf.read(str(out_wav), dtype="int16")
        assert rate == 24000 and pcm.shape == (doc["num_frames"] * 2048,)
        assert doc["timings"]["first_frame_ms"] is not None
    else:
        assert doc["stop"] == "eot" and doc["num_frames"] == 0 and not out_wav.exists()


@pytest.mark.parametrize("task", ["t1a2", "t1t2"])
def test_generate_text_tasks(tiny_ckpt: Path, tmp_path: Path, task: str) -> None:
    out_json = tmp_path / "t.json"
    assert main(["generate", "--checkpoint-dir", str(tiny_ckpt), "--task", task,
                 "--input-text", "What is your name?", "--tokens-json", str(out_json)]) == 0  # fmt: skip
    doc = json.loads(out_json.read_text())
    assert doc["timings"]["encode_ms"] < 1000 and doc["num_steps"] > 1


def test_generate_budget(tiny_ckpt: Path, tmp_path: Path) -> None:
    out_json = tmp_path / "t.json"
    main(["generate", "--checkpoint-dir", str(tiny_ckpt), "--task", "t1a2", "--input-text", "hi",
          "--max-new-tokens", "9", "--tokens-json", str(out_json)])  # fmt: skip
    doc = json.loads(out_json.read_text())
    assert (doc["stop"], doc["num_steps"], doc["num_frames"]) == ("budget", 9, 2)


def test_any_rate_and_channels_become_16k_mono() -> None:
    mono = load_audio_file(FIXTURES / "question.wav")
    stereo44 = load_audio_file(FIXTURES / "question_44k_stereo.wav")
    assert mono.dtype == np.float32 and stereo44.dtype == np.float32
    assert abs(stereo44.size - mono.size) <= 2
    n = min(mono.size, stereo44.size)
    assert np.corrcoef(mono[:n], stereo44[:n])[0, 1] > 0.99
    raw, _ = sf.read(str(FIXTURES / "question.wav"), dtype="int16")
    assert np.array_equal(mono, raw.astype(np.float32) / 32768.0)  # whisper.load_audio semantics


def test_feature_frames_rule() -> None:
    assert feature_frames(16000) == 51  # int(1000 / 20) + 1
    assert feature_frames(21457) == 68
    assert feature_frames(30 * 16000) == 1500  # capped at the encoder's 1500 frames


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: sf.write(str(p), np.zeros(0, np.int16), 16000), "is empty"),
        (lambda p: sf.write(str(p), np.zeros(31 * 16000, np.int16), 16000), "at most 30 s"),
        (lambda p: p.write_bytes(b"not a wav at all"), "cannot be read"),
    ],
)
def test_bad_input_audio(tmp_path: Path, make, message: str) -> None:
    p = tmp_path / "in.wav"
    make(p)
    with pytest.raises(InputError, match=message):
        load_audio_file(p)


def test_cli_reports_errors_cleanly(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["generate", "--checkpoint-dir", str(tiny_ckpt), "--task", "a1a2",
                 "--input-wav", str(tmp_path / "missing.wav")]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--checkpoint-dir", str(tiny_ckpt), "--task", "t1t2"]) == 2
    assert "needs --input-text" in capsys.readouterr().err
    assert main(["generate", "--checkpoint-dir", str(tmp_path / "nope"), "--task", "t1t2", "--input-text", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_make_checkpoint_is_deterministic_per_seed(tiny_ckpt: Path, tmp_path: Path) -> None:
    again = make_checkpoint(tmp_path / "again", "tiny", seed=0)
    other = make_checkpoint(tmp_path / "other", "tiny", seed=1)
    files = ["lit_model.pth", "whisper/small.pt", "snac/pytorch_model.bin"]
    for rel in files:
        a, b = torch.load(tiny_ckpt / rel, weights_only=True), torch.load(again / rel, weights_only=True)
        a = a.get("model_state_dict", a)
        b = b.get("model_state_dict", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    for rel in ["model_config.yaml", "tokenizer.json", "snac/config.json"]:
        assert (tiny_ckpt / rel).read_bytes() == (again / rel).read_bytes(), rel
    a = torch.load(tiny_ckpt / "lit_model.pth", weights_only=True)
    b = torch.load(other / "lit_model.pth", weights_only=True)
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


def test_make_checkpoint_cli_writes_the_upstream_layout(tmp_path: Path) -> None:
    assert main(["make-checkpoint", str(tmp_path / "ck"), "--size", "tiny", "--seed", "3"]) == 0
    names = {str(p.relative_to(tmp_path / "ck")) for p in (tmp_path / "ck").rglob("*") if p.is_file()}
    assert names >= {"lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
                     "whisper/small.pt", "snac/config.json", "snac/pytorch_model.bin"}  # fmt: skip
    whisper = torch.load(tmp_path / "ck" / "whisper" / "small.pt", weights_only=True)
    assert set(whisper) == {"dims", "model_state_dict"}
    assert any(k.startswith("decoder.") for k in whisper["model_state_dict"])  # a whole openai-whisper file


def test_bench_decode_writes_json(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "decode", "--checkpoint-dir", str(tiny_ckpt), "--steps", "8", "--repeats", "1",
                 "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["steps_per_s"] > 0 and doc["real_time_factor"] == pytest.approx(doc["steps_per_s"] / 11.71875, rel=1e-2)
    assert {"cpu_model", "cores", "torch", "threads", "device"} <= set(doc["machine"])
    # what --dtype auto would pick here, and why
    assert doc["auto"]["choice"] in doc["auto"]["ms_per_step"] and doc["auto"]["reason"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["latency", "--speculate", "none"], "--speculate: expected comma-separated integers or 'off', got 'none'"),
        (["latency", "--first-chunk-lookahead", "0,x"], "or 'exact', got '0,x'"),
        (["pipeline", "--sessions", "1,two"], "argument --sessions: expected comma-separated integers, got '1,two'"),
        (["kernels", "--rows", ""], "argument --rows: expected comma-separated integers, got ''"),
    ],
)
def test_bench_number_lists_are_refused_with_a_clear_message(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2  # argparse's usage error, not a traceback
    assert message in capsys.readouterr().err


def test_bench_latency_writes_json(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--checkpoint-dir", str(tiny_ckpt), "--runs", "1", "--max-new-tokens", "30",
                 "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    server, server_spec, semantic, semantic_spec = doc["runs"]  # side by side, the same question
    assert server["turn_detection"] == "server_vad" and semantic["turn_detection"] == "semantic_vad"
    assert server["ttfa_ms"] > server["vad_hangover_ms"] >= 400  # the 500 ms silence window, less decay
    assert semantic["ttfa_ms"] > semantic["vad_hangover_ms"] > 0
    assert server["barge_in_detected"] is True
    assert server["speculation_lead_ms"] is None and semantic["speculation_lead_ms"] is None
    assert server_spec["speculation_lead_ms"] is not None and semantic_spec["speculation_lead_ms"] is not None
    labels = {"server_vad", "server_vad+spec160", "semantic_vad", "semantic_vad+spec160"}
    assert set(doc["median"]) == set(doc["p90"]) == labels
    assert set(doc["fast_start_error"]) == {"0", "1", "2"}  # the opt-in first chunk's error, per lookahead
    threads = doc["stage_threads"]  # what each stage's own thread runs with, measured there
    assert threads["llm"] >= 1 and threads["encoder"] >= 1 and threads["snac"] >= 1 and threads["asr"] == 1
    assert {"cpu_model", "cores", "torch"} <= set(doc["machine"])


def test_bench_soak_writes_json(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "soak.json"
    # With these two step kinds, seed 3 scripts the first conversation of client 0 as two bad-frame steps and
    # an abrupt disconnect (done in ~4 s), and client 1's as a barge-in first: every kind runs in the 9 s.
    rc = main(["bench", "soak", "--checkpoint-dir", str(tiny_ckpt), "--minutes", "0.15", "--sessions", "2",
               "--seed", "3", "--steps", "bad_frames,barge_in_vad", "--disconnect-share", "1",
               "--json", str(out)])  # fmt: skip
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["ok"] is True and doc["failures"] == [], doc["failures"]
    assert set(doc) >= {"turns_completed", "turns_by_step", "responses_by_status", "barge_ins", "barge_ins_by_mode",
                        "disconnects", "bad_frames", "errors_by_code", "unexpected_closes", "timeouts",
                        "stuck_sessions", "rss_series", "rss", "ttfa_ms", "machine"}  # fmt: skip
    assert doc["in_process"] is True and doc["connections"] >= 3
    assert doc["stuck_sessions"] == 0 and doc["unexpected_closes"] == 0 and doc["timeouts"] == {}
    bad = doc["bad_frames"]
    assert bad["sent"] >= 6 and bad["answered"] == bad["sent"] and bad["mismatched"] == []
    assert sum(doc["errors_by_code"].values()) == bad["sent"] and doc["unprovoked_errors_by_code"] == {}
    assert doc["disconnects"] >= 1
    vad = doc["barge_ins_by_mode"]["vad"]
    assert vad["attempted"] >= 1 and vad.get("cancelled", 0) >= 1 and doc["responses_by_status"]["cancelled"] >= 1
    assert doc["turns_by_step"].get("barge_in_vad_followup", 0) >= 1  # the interrupting speech was answered
    series = doc["rss_series"]
    assert len(series) >= 3 and all(s["rss_mb"] > 0 for s in series)
    assert doc["rss"]["growth_pct"] is not None and doc["rss"]["peak_mb"] >= doc["rss"]["warmup_mb"]
    printed = capsys.readouterr().out
    assert "stuck sessions 0" in printed and "[soak" in printed and "OK" in printed
