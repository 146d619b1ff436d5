"""Random-weight checkpoints in exactly the upstream Mini-Omni layout.

`tiny` loads and generates in seconds on a CPU; `full` has the real shapes (speed work).
Weights are random but shaped so the demo behaves like a conversation partner: it
emits varied tokens and ends its answers by itself (see `_shape_weights`).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from whisper.model import ModelDimensions, Whisper

from .checkpoint import LIT_MODEL, MODEL_CONFIG, TOKENIZER, omni_to_litgpt
from .config import FULL_CONFIG, TINY_CONFIG, ModelConfig
from .llm import OmniLM
from .vision import CLIP_FILE

log = logging.getLogger(__name__)

SIZES = ("tiny", "full")
FAMILIES = ("mini-omni", "mini-omni2")

WHISPER_DIMS = {
    "tiny": ModelDimensions(80, 1500, 64, 2, 2, 51865, 448, 64, 2, 2),
    "full": ModelDimensions(80, 1500, 768, 12, 12, 51865, 448, 768, 12, 12),  # openai-whisper "small"
}
SNAC_CONFIGS = {
    "tiny": {"decoder_dim": 64},
    "full": {"decoder_dim": 1024},  # hubertsiuzdak/snac_24khz
}
_SNAC_24KHZ = {
    "sampling_rate": 24000,
    "encoder_dim": 48,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 4096,
    "codebook_dim": 8,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}

_CORPUS = """\
Hello, how are you today? I am fine, thank you. What is your name? My name is Omni.
What can you do? I can listen to you and answer with my voice. Tell me a joke.
What is the weather like today? It is sunny and warm, with a light breeze from the sea.
Do you like music? I like many kinds of music, from jazz to classical and pop songs.
How do you make a cup of tea? Boil water, pour it over the leaves, and wait three minutes.
Can you describe your surroundings? I live in a computer, so I hear voices and see numbers.
What did you do yesterday? I talked with many people and learned about their day.
What is your favorite book and why? I enjoy stories about travel and friendship.
Can you explain the concept of time? Time is how we measure change from one moment to the next.
Please stop. Okay, I will stop talking now. Yes, yeah, uh-huh, right, sure, no problem.
Good morning! Good night! See you later. Thanks for listening. Let me think about that.
The quick brown fox jumps over the lazy dog. One, two, three, four, five, six, seven, eight.
"""

# Hidden coordinates the random demo model reserves for its stopping circuit.
C_CONST, C_SINK, C_ANS, C_AFTER, C_STOP = range(5)
_N_RESERVED = 5


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A small byte-level BPE (the real checkpoint carries Qwen2's 151k-token one)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tok


@torch.no_grad()
def _shape_weights(model: OmniLM, speakable: list[int], g: torch.Generator) -> None:
    """Make random weights behave: varied tokens, answers that end by themselves.

    Random layers get O(1) outputs so history matters, and a two-head circuit counts the
    answer's length. Layer 0: a "flag" head attends (very strongly) to the answer marker
    (_answer_t / _asr, the prompt's last text token) when it is in its causal window, so
    its output is ~1 at the answer's positions and 0 inside the prompt. Layer 1: a counter
    head attends to position 0 (an attention sink on _input_t, weighted like K positions)
    and uniformly elsewhere, averaging that flag: it grows like n / (K + T + n) over an
    answer of n steps after a prompt of T. The head rows of _eot and of layer 6's _eoa fire
    when it crosses two thresholds: text ends after ~15 steps, audio after ~40, a little
    longer for longer questions. Attention scores use the slowest RoPE pair, which barely
    rotates over 2048 positions, so they ignore distance. No other weight writes the
    reserved coordinates, so the circuit works at any depth >= 2 and any width.
    """
    cfg, lay = model.config, model.layout
    C, hs = cfg.n_embd, cfg.head_size
    if cfg.n_layer < 2:
        raise ValueError("the random demo model needs at least 2 layers")

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    # -- embeddings: random content, fixed reserved coordinates
    kappa, rho = 4.0, 8.0
    E = model.backbone.embed_tokens.weight
    E.copy_(randn(*E.shape))
    E[:, :_N_RESERVED] = 0.0
    E[:, C_CONST] = kappa
    E[lay.input_t, C_SINK] = rho
    E[lay.answer_t, C_ANS] = rho
    E[lay.asr, C_ANS] = rho

    layers = model.backbone.decoder_layers()
    # -- transformer layers: O(1) random maps that never write the reserved coordinates
    for layer in layers:
        lin: nn.Linear
        for lin in (
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
            layer.mlp.down_proj,
        ):
            lin.weight.copy_(randn(*lin.weight.shape, std=0.7 / math.sqrt(lin.in_features)))
            if lin.bias is not None:
                lin.bias.zero_()
        layer.self_attn.o_proj.weight[:_N_RESERVED] = 0.0
        layer.mlp.down_proj.weight[:_N_RESERVED] = 0.0
    for ad in (model.whisper_adapter, model.vision_adapter):
        if ad is not None:
            for lin in (ad.fc_1, ad.fc_2, ad.proj):
                lin.weight.copy_(randn(*lin.weight.shape, std=1.0 / math.sqrt(lin.in_features)))
            ad.proj.weight[:_N_RESERVED] = 0.0

    d = hs // 2 - 1  # the slowest RoPE pair
    q_per_kv = cfg.q_per_kv
    rms_guess = math.sqrt((kappa**2 + (C - _N_RESERVED) / 8) / C)  # typical RMS of an averaged embedding
    const_n, marker_n = kappa / rms_guess, rho / 8 / rms_guess
    qd = 4.0

    def sink_head(layer: int, key_coord: int, log_weight: float, value_coord: int, out_coord: int) -> None:
        """Query group 0 of `layer` attends to positions holding key_coord with weight e^log_weight."""
        attn = layers[layer].self_attn
        attn.q_proj.weight[: q_per_kv * hs] = 0.0
        for h in range(q_per_kv):
            attn.q_proj.weight[h * hs + d, C_CONST] = qd / const_n
        attn.k_proj.weight[:hs] = 0.0
        attn.k_proj.weight[d, key_coord] = log_weight * math.sqrt(hs) / qd / marker_n
        attn.v_proj.weight[:hs] = 0.0
        attn.v_proj.weight[0, value_coord] = 1.0
        attn.o_proj.weight[:, : q_per_kv * hs] = 0.0
        attn.o_proj.weight[out_coord, 0] = 1.0

    sink_head(0, C_ANS, 14.0, C_ANS, C_AFTER)  # flag: ~1 once the answer marker is in view
    sink_head(1, C_SINK, math.log(SINK_WEIGHT), C_AFTER, C_STOP)  # counter

    # -- output head: random rows for real tokens, thresholds for _eot / _eoa, specials never
    assert isinstance(model.lm_head, nn.Linear)  # a fresh fp32 model, never the int8 head
    W = model.lm_head.weight
    W.copy_(randn(*W.shape, std=3.0 / math.sqrt(C)))
    W[:, :_N_RESERVED] = 0.0
    never = -4.0  # logit offset (times the normed const coordinate) of ids the demo must not emit
    text_rows = W[: lay.padded_text_vocab_size]
    allowed = torch.zeros(lay.padded_text_vocab_size, dtype=torch.bool)
    allowed[torch.tensor(speakable, dtype=torch.long)] = True
    text_rows[~allowed] = 0.0
    text_rows[~allowed, C_CONST] = never
    # Anti-repeat: each real token's row points away from its own embedding, so feeding a
    # token back makes it less likely next step (random greedy decoding loves fixed points).
    anti = 1.0 / kappa
    text_rows[allowed, _N_RESERVED:] -= anti * E[: lay.padded_text_vocab_size][allowed, _N_RESERVED:]
    real = torch.cat([allowed, torch.ones(W.shape[0] - lay.padded_text_vocab_size, dtype=torch.bool)])
    for i in range(lay.num_audio_layers):
        s = lay.audio_shift(i)
        W[s + lay.num_codes : s + lay.padded_audio_vocab_size, :] = 0.0
        W[s + lay.num_codes : s + lay.padded_audio_vocab_size, C_CONST] = never
        W[s : s + lay.num_codes, _N_RESERVED:] -= anti * E[s : s + lay.num_codes, _N_RESERVED:]
        real[s + lay.num_codes : s + lay.padded_audio_vocab_size] = False
    # The counter grows through an answer; real tokens read it with random weights, so the
    # preferred tokens drift as the answer goes on instead of settling into a loop.
    W[real, C_STOP] = randn(int(real.sum()), std=DRIFT)
    # _eot / _eoa fire once the counter, relative to the const coordinate, crosses a threshold.
    sharp = 200.0
    W[lay.eot, :] = 0.0
    W[lay.eot, C_STOP] = sharp
    W[lay.eot, C_CONST] = -sharp * STOP_RATIO_TEXT
    eoa6 = lay.audio_global(lay.eoa, lay.num_audio_layers - 1)
    W[eoa6, :] = 0.0
    W[eoa6, C_STOP] = sharp
    W[eoa6, C_CONST] = -sharp * STOP_RATIO_AUDIO


# Bump when the random weights a (size, seed) gives change, so cached demo checkpoints are remade.
RECIPE_VERSION = 1

# Tuned on the tiny model (see tests/test_decoding.py): answers of ~20 text tokens and ~3-5 s of audio.
SINK_WEIGHT, DRIFT, STOP_RATIO_TEXT, STOP_RATIO_AUDIO = 512.0, 8.0, 0.07, 0.13


def speakable_ids(tok: Tokenizer) -> list[int]:
    """Token ids that decode to a word or punctuation (no stray bytes): what the demo may say."""
    ids = []
    for i in range(tok.get_vocab_size()):
        piece = tok.decode([i])
        word = piece.strip()
        if (word.isalpha() and len(word) >= 2 and word.isascii()) or word in {".", ",", "?", "!"}:
            ids.append(i)
    return ids


def random_llm(cfg: ModelConfig, seed: int, speakable: list[int], image_sink: bool = False) -> OmniLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OmniLM(cfg)
    g = torch.Generator().manual_seed(seed)
    _shape_weights(model, speakable, g)
    if image_sink:
        # Image prompts open with `_image` on the 7 audio streams instead of `_input_t`: give
        # it the same averaged sink weight, so image answers end like audio ones.
        lay, E = model.layout, model.backbone.embed_tokens.weight
        with torch.no_grad():
            for i in range(lay.num_audio_layers):
                E[lay.audio_global(lay.image, i), C_SINK] = E[lay.input_t, C_SINK] / lay.num_audio_layers
    return model.eval()


class _ClipBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)})
        self.ln_2 = nn.LayerNorm(width)


class _ClipTower(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([_ClipBlock(width) for _ in range(layers)])


class _ClipVisual(nn.Module):
    def __init__(self, width: int, layers: int, embed: int, patch: int = 32, resolution: int = 224) -> None:
        super().__init__()
        grid = resolution // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _ClipTower(width, layers)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed))


class _OpenAIClipFile(nn.Module):
    """Holds parameters under OpenAI CLIP's names; scripted only to be saved as OpenAI does."""

    def __init__(self, dims: dict[str, int], context: int = 77) -> None:
        super().__init__()
        self.visual = _ClipVisual(dims["vision_width"], dims["vision_layers"], dims["embed"])
        self.transformer = _ClipTower(dims["text_width"], dims["text_layers"])
        self.token_embedding = nn.Embedding(dims["vocab"], dims["text_width"])
        self.positional_embedding = nn.Parameter(torch.zeros(context, dims["text_width"]))
        self.ln_final = nn.LayerNorm(dims["text_width"])
        self.text_projection = nn.Parameter(torch.zeros(dims["text_width"], dims["embed"]))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # OpenAI's archives carry these as tensors; its loader drops them from the state dict.
        self.register_buffer("input_resolution", torch.tensor(224))
        self.register_buffer("context_length", torch.tensor(context))
        self.register_buffer("vocab_size", torch.tensor(dims["vocab"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# What OpenAI's loader (and so Mini-Omni2) rounds through fp16: conv, linear, attention and
# projection weights. Embeddings and layer norms stay fp32 (see model/vision.py).
def _openai_fp16(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (
        name.endswith(("conv1.weight", "in_proj_weight", "in_proj_bias", "text_projection", "visual.proj"))
        or ".out_proj." in name
        or ".c_fc." in name
        or ".c_proj." in name
    ) and leaf != "logit_scale"


def write_random_clip(path: Path, size: str, seed: int) -> None:
    """A random CLIP in OpenAI's file format: a TorchScript archive of `visual.*` + text tower.

    full: ViT-B/32's shapes, fp16 where OpenAI's file is fp16; tiny: small, all fp32 (so the
    loader's fp16 rounding is exercised)."""
    dims = CLIP_DIMS[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = _OpenAIClipFile(dims)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = dict(m.named_parameters())
        for name in sorted(params):
            p, leaf = params[name], name.rsplit(".", 1)[-1]
            if leaf == "logit_scale":
                continue
            if ".ln_" in "." + name:
                p.copy_((1.0 if leaf == "weight" else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # biases and the class embedding
                p.copy_((p.shape[0] ** -0.5 if leaf == "class_embedding" else 0.1) * torch.randn(p.shape, generator=g))
            elif leaf in ("proj", "text_projection", "positional_embedding"):
                p.copy_(
                    p.shape[-1 if leaf == "positional_embedding" else 0] ** -0.5 * torch.randn(p.shape, generator=g)
                )
            elif "token_embedding" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:  # conv / linear / in_proj weights (out, in, ...)
                p.copy_(math.prod(p.shape[1:]) ** -0.5 * torch.randn(p.shape, generator=g))
            if size == "full" and _openai_fp16(name):
                p.data = p.data.half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.save(torch.jit.script(m.eval()), str(path))


def _snac_legacy_state_dict(sd: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Parametrized weight-norm names -> the legacy weight_g / weight_v names the hub file uses."""
    for key, value in sd.items():
        if key.endswith(".parametrizations.weight.original0"):
            yield key.replace(".parametrizations.weight.original0", ".weight_g"), value
        elif key.endswith(".parametrizations.weight.original1"):
            yield key.replace(".parametrizations.weight.original1", ".weight_v"), value
        else:
            yield key, value


# OpenAI CLIP shapes: "full" is ViT-B/32 itself; "tiny" keeps its 224 px / 32 px patches (50 tokens).
CLIP_DIMS = {
    "tiny": {"embed": 32, "vision_width": 64, "vision_layers": 2, "text_width": 64, "text_layers": 1, "vocab": 512},
    "full": {"embed": 512, "vision_width": 768, "vision_layers": 12, "text_width": 512, "text_layers": 12,
             "vocab": 49408},
}  # fmt: skip


def make_checkpoint(out_dir: str | Path, size: str = "tiny", seed: int = 0, family: str = "mini-omni") -> Path:
    """Write a random-weight Mini-Omni (or Mini-Omni2) checkpoint directory; deterministic per
    (size, seed, family). Mini-Omni2 adds the vision adapter, `vision_adapter_dim`, OpenAI's
    `ViT-B-32.pt` (random CLIP, TorchScript archive) and keeps Whisper at `small.pt` as its release."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    from snac import SNAC

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TINY_CONFIG if size == "tiny" else FULL_CONFIG
    cfg = cfg.replace(name=f"{family}-random-{size}")
    omni2 = family == "mini-omni2"
    if omni2:
        cfg = cfg.replace(vision_adapter_dim=CLIP_DIMS[size]["embed"])

    log.info("training the demo tokenizer")
    tok = train_tokenizer()
    tok.save(str(out / TOKENIZER))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"add_bos_token": False, "tokenizer_class": "Qwen2Tokenizer", "model_max_length": cfg.block_size}, indent=2
        )
        + "\n"
    )
    (out / MODEL_CONFIG).write_text(yaml.safe_dump(cfg.to_litgpt_dict(), sort_keys=True))

    log.info("making random %s LLM weights (seed %d)", size, seed)
    llm = random_llm(cfg, seed, speakable_ids(tok), image_sink=omni2)
    torch.save(omni_to_litgpt(llm.state_dict(), cfg), out / LIT_MODEL)
    del llm

    log.info("making random Whisper encoder weights")
    dims = WHISPER_DIMS[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        whisper = Whisper(dims)
        # The decoder's positional embedding is left as torch.empty: fill it so files are reproducible.
        torch.nn.init.normal_(whisper.decoder.positional_embedding, std=0.01)
    whisper_sd = {k: v.half() if size == "full" else v for k, v in whisper.state_dict().items()}
    whisper_file = out / "small.pt" if omni2 else out / "whisper" / "small.pt"  # where each release has it
    whisper_file.parent.mkdir(exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": whisper_sd}, whisper_file)
    del whisper

    if omni2:
        log.info("making random CLIP ViT-B/32 weights")
        write_random_clip(out / CLIP_FILE, size, seed + 3)

    log.info("making random SNAC weights")
    snac_cfg = {**_SNAC_24KHZ, **SNAC_CONFIGS[size]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        snac = SNAC(**snac_cfg)
    (out / "snac").mkdir(exist_ok=True)
    (out / "snac" / "config.json").write_text(json.dumps(snac_cfg, indent=2) + "\n")
    torch.save(dict(_snac_legacy_state_dict(snac.state_dict())), out / "snac" / "pytorch_model.bin")
    (out / "README.md").write_text(
        f"Random-weight {family} checkpoint ({size}, seed {seed}) written by `omnivox make-checkpoint`.\n"
        "It has the upstream file layout and shapes but no training: it speaks noise.\n"
    )
    return out


def cached_checkpoint(cache_root: str | Path, size: str = "tiny", seed: int = 0, family: str = "mini-omni") -> Path:
    """The random checkpoint (size, seed, family) under cache_root, made once; atomic against crashes."""
    import shutil
    import tempfile

    prefix = "random" if family == "mini-omni" else "random-omni2"
    target = Path(cache_root) / f"{prefix}-{size}-seed{seed}-v{RECIPE_VERSION}"
    if (target / LIT_MODEL).is_file() and (target / "snac" / "pytorch_model.bin").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("making the %s random checkpoint in %s (once)", size, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        make_checkpoint(tmp, size, seed, family)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
