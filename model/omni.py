"""OmniModel: a loaded checkpoint (LLM, tokenizer, Whisper encoder, SNAC) and the
high-level calls every front end uses: build a prompt, start a generation, decode audio.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import WhisperEncoder
from .checkpoint import (
    LIT_MODEL,
    MODEL_CONFIG,
    build_llm,
    litgpt_to_omni,
    load_lit_state_dict,
    load_snac,
    load_whisper,
    resolve_checkpoint,
)
from .codec import SnacCodec, replace_non_codes
from .config import PRECISIONS, QUANTIZED_PRECISIONS, WHISPER_WINDOWS, ModelConfig
from .decoding import Generation, SamplingConfig
from .errors import CheckpointError, InputError
from .layout import TokenLayout
from .llm import OmniLM
from .probe import ManyRowsProbe, ProbeResult, probe_many_rows, probe_precisions
from .prompts import Prompt, Task, build_prompt
from .tokenizer import TextTokenizer
from .vision import NO_IMAGES, ClipImageEncoder, load_clip

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def release_freed_memory() -> None:
    """Hand memory freed after loading back to the OS. glibc keeps freed blocks in its arenas
    unless trimmed: without this the resident size after loading the full model varied from
    2.1 to 4.7 GB between identical runs."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def resolve_precision(precision: str | torch.dtype, device: str) -> str:
    """Validate a precision: float32 | bfloat16 | int8 | int4, or "auto". "auto" is bfloat16 on
    CUDA and stays "auto" on a CPU, where OmniModel.load times the candidates on the host
    (model.probe: the fastest of float32, bfloat16 and int8, a more exact one on a near tie)."""
    if isinstance(precision, torch.dtype):
        precision = str(precision).removeprefix("torch.")
    if precision not in PRECISIONS:
        raise InputError(f"dtype must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if device.startswith("cuda") else "auto"
    if precision in QUANTIZED_PRECISIONS and not device.startswith("cpu"):
        raise InputError(f"dtype {precision} is a CPU mode; use bfloat16 on CUDA")
    return precision


@dataclass
class OmniModel:
    config: ModelConfig
    llm: OmniLM
    tokenizer: TextTokenizer
    whisper: WhisperEncoder | None
    codec: SnacCodec | None
    source: str
    clip: ClipImageEncoder | None = None  # Mini-Omni2 checkpoints only
    whisper_window: str = "padded"  # model.config.WHISPER_WINDOWS
    auto_probe: ProbeResult | None = None  # how `--dtype auto` chose, when it did on a CPU
    many_rows_probe: ManyRowsProbe | None = None  # a quantized mode's prefill and encoder kernels

    @property
    def family(self) -> str:
        """ "mini-omni2" when the checkpoint has a vision adapter, else "mini-omni"."""
        return "mini-omni2" if self.takes_images else "mini-omni"

    @property
    def precision(self) -> str:
        """float32 | bfloat16 | int8 | int4: what the LLM's weights are."""
        return self.llm.quantized or str(self.llm.dtype).removeprefix("torch.")

    @property
    def takes_images(self) -> bool:
        return self.config.vision_adapter_dim is not None

    @property
    def layout(self) -> TokenLayout:
        return self.config.layout

    @classmethod
    def load(
        cls,
        spec: str | Path,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        with_whisper: bool = True,
        with_snac: bool = True,
        with_clip: bool = True,
        whisper_window: str = "padded",
        decode_graph: bool = True,
        llm_threads: int | None = None,
    ) -> OmniModel:
        """Load a checkpoint directory or hub id (see DESIGN.md section 2 for the layout).

        whisper_window: "padded" encodes each turn in Whisper's 30 s window (exact);
        "trimmed" encodes only the turn's length (approximate, opt-in; model.audio).
        decode_graph: int8 on a CPU runs its decode steps as one ONNX Runtime graph of the same
        weights (model.decode_graph), ~1.5x the torch step; False keeps them in torch.
        llm_threads: the graph's threads (default every core, as the runner's llm stage).
        """
        precision = resolve_precision(dtype, device)
        if whisper_window not in WHISPER_WINDOWS:
            raise InputError(f"whisper_window must be one of {', '.join(WHISPER_WINDOWS)}, got {whisper_window!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise CheckpointError(f"device {device} was asked for but CUDA is not available")
        t0 = time.perf_counter()
        root = resolve_checkpoint(spec)
        config = ModelConfig.from_yaml(root / MODEL_CONFIG)
        probe = probe_precisions(config) if precision == "auto" else None
        if probe is not None:
            precision = probe.choice
        # int8/int4 quantize from the fp32 weights; how they run a prefill and whether the
        # encoders run in bf16 are timed on this host (about a second).
        quantized = precision in QUANTIZED_PRECISIONS
        torch_dtype = torch.float32 if quantized else DTYPES[precision]
        rows_probe = probe_many_rows(config) if quantized else None
        encoder_dtype = DTYPES[rows_probe.encoder_dtype] if rows_probe is not None else torch_dtype
        lit_sd = load_lit_state_dict(root / LIT_MODEL)
        llm = build_llm(config, litgpt_to_omni(lit_sd, config, str(root / LIT_MODEL)), device, torch_dtype)
        if rows_probe is not None:
            llm.quantize_(precision, many_rows=rows_probe.many_rows, adapter_dtype=encoder_dtype)
        tokenizer = TextTokenizer.from_dir(root)
        whisper = load_whisper(root).to(device) if with_whisper else None
        # bf16 encoders: half the 30 s Whisper encode (features within ~1% of fp32) and half a
        # SNAC decode (~1% of peak).
        if whisper is not None and encoder_dtype != torch.float32:
            whisper.cast_(encoder_dtype)
        if whisper is not None and whisper.feature_dim != config.whisper_adapter_dim:
            raise CheckpointError(
                f"Whisper encoder width {whisper.feature_dim} != whisper_adapter_dim "
                f"{config.whisper_adapter_dim} in {MODEL_CONFIG}"
            )
        clip = None
        if with_clip and config.vision_adapter_dim is not None:
            clip = load_clip(root).to(device)  # fp32, as the release runs it on CPU
            if clip.feature_dim != config.vision_adapter_dim:
                raise CheckpointError(
                    f"CLIP projection width {clip.feature_dim} != vision_adapter_dim "
                    f"{config.vision_adapter_dim} in {MODEL_CONFIG}"
                )
        codec = load_snac(root) if with_snac else None
        if codec is not None:
            codec.snac.to(device)
            if encoder_dtype != torch.float32:
                codec.cast_(encoder_dtype)
        del lit_sd
        if decode_graph and llm.takes_decode_graph:
            release_freed_memory()  # the fp32 weights go before the graph's build copies the int8 ones
            llm.attach_decode_graph(threads=llm_threads)
        release_freed_memory()  # the fp32 state dict (and a quantized mode's fp32 copies) would else stay resident
        model = cls(config, llm, tokenizer, whisper, codec, str(root), clip, whisper_window, probe, rows_probe)
        log.info(
            "loaded %s (%s, %s, %s, whisper window %s) in %.1f s",
            root, model.family, device, precision, whisper_window, time.perf_counter() - t0,
        )  # fmt: skip
        if whisper_window == "trimmed" and with_whisper:
            log.warning(
                "whisper window trimmed: on trained Whisper weights (tiny.en) its features are 23-41%% off the "
                "padded encode the model was trained on; answers will suffer (README, Whisper encode)"
            )
        return model

    def encode_audio(self, audio: np.ndarray) -> torch.Tensor:
        """16 kHz mono float audio -> (L, C) Whisper features."""
        if self.whisper is None:
            raise InputError("this model was loaded without a Whisper encoder")
        return self.whisper.encode(audio, self.whisper_window)

    def encode_image(self, image: object) -> torch.Tensor:
        """A decoded PIL image (model.vision.decode_image) or its preprocessed pixels -> (50, D)
        CLIP features."""
        if not self.takes_images:
            raise InputError(NO_IMAGES)
        if self.clip is None:
            raise InputError("this model was loaded without its CLIP image encoder")
        return self.clip.encode(image)

    def prompt(
        self, task: Task, *, audio: np.ndarray | None = None, text: str | None = None, image: object | None = None
    ) -> Prompt:
        if task.image_in:
            if image is None or audio is None:
                raise InputError(f"task {task.value} needs an input image and input audio")
            return build_prompt(
                task, self.layout, audio_features=self.encode_audio(audio), image_features=self.encode_image(image)
            )
        if task.audio_in:
            if audio is None:
                raise InputError(f"task {task.value} needs input audio")
            return build_prompt(task, self.layout, audio_features=self.encode_audio(audio))
        if text is None or not text.strip():
            raise InputError(f"task {task.value} needs a non-empty input text")
        return build_prompt(task, self.layout, text_ids=self.tokenizer.encode(text))

    def start(
        self,
        prompt: Prompt,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int | None = None,
        stop_rules: bool = True,
    ) -> Generation:
        return Generation(self.llm, prompt, sampling, max_new_tokens, stop_rules)

    def decode_frames(self, frames: torch.Tensor) -> np.ndarray:
        """(N, 7) raw frames -> 24 kHz float audio; non-code ids replaced (see codec.replace_non_codes)."""
        if self.codec is None:
            raise InputError("this model was loaded without SNAC")
        return self.codec.decode(replace_non_codes(frames, self.layout.num_codes))

    def text_of(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids).strip()
