"""Mini-Omni2's image side: OpenAI CLIP ViT-B/32 as the release runs it, its preprocessing,
and bounded, safe image decoding.

The encoder is transformers' `CLIPVisionModel` (a maintained implementation already in our
dependencies; open_clip would add a second CLIP stack for the same weights), loaded from
OpenAI's own `ViT-B-32.pt` (a TorchScript archive: only its state dict is read). Two details
of the release are kept so features equal its features for any checkpoint:
- the final layer norm and projection apply to ALL 50 tokens (class token + 7x7 patches),
  not only the class token: (50, 512) features per image;
- OpenAI's loader rounds the conv/linear/attention weights and the projection to fp16 and
  back even on CPU (class/position embeddings and layer norms stay fp32); we do the same.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .errors import CheckpointError, InputError

log = logging.getLogger(__name__)

CLIP_FILE = "ViT-B-32.pt"
# OpenAI's download for "ViT-B/32"; the path segment is the file's SHA-256.
CLIP_URL = (
    "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
IMAGE_TOKENS = 50  # class token + 7 x 7 patches of 32 px

# Bounds on what a user may send (decoded pixels are what costs memory).
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


NO_IMAGES = "this checkpoint takes no images (Mini-Omni); images need a Mini-Omni2 checkpoint"


class ImageError(InputError):
    """An image that cannot be used: not an image, truncated, too large, unsupported format."""


def decode_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> object:
    """Encoded PNG/JPEG/WebP bytes -> a fully decoded PIL image; ImageError says what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("the image is empty")
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"the image is {w}x{h} pixels; the limit is {max_pixels} pixels")
            img.load()  # decode now: a truncated file fails here, not later on the runner
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not a {', '.join(IMAGE_FORMATS)} image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"the image could not be decoded: {e}") from None
    return img


def open_image_file(path: str | Path) -> object:
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"image file {p} does not exist")
    return decode_image(p.read_bytes(), max_bytes=max(MAX_IMAGE_BYTES, p.stat().st_size))


def preprocess(img: object, size: int = IMAGE_SIZE) -> torch.Tensor:
    """CLIP's preprocessing, step for step as the release does it: shorter side to `size`
    (bicubic, PIL), centre crop, then RGB, then [0, 1] and the CLIP mean/std -> (3, size, size)."""
    from PIL import Image

    assert isinstance(img, Image.Image)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # round half to even, as torchvision
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def image_pixels(data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded image bytes -> the (3, 224, 224) CLIP pixels: all an image turn keeps of it."""
    return preprocess(decode_image(data, max_bytes, max_pixels))


def read_clip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """OpenAI's file is a TorchScript archive; a plain state-dict file is accepted too."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except RuntimeError:
        pass
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is neither a TorchScript archive nor a state dict: {e}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a CLIP state dict")
    return sd


def _fp16_round(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float16).float()


class ClipImageEncoder(nn.Module):
    """pixels (B, 3, 224, 224) -> (B, 50, D) projected CLIP features of every token."""

    def __init__(self, config: CLIPVisionConfig, projection_dim: int) -> None:
        super().__init__()
        self.vision = CLIPVisionModel(config)
        self.proj = nn.Linear(config.hidden_size, projection_dim, bias=False)

    @property
    def feature_dim(self) -> int:
        return self.proj.out_features

    @classmethod
    def from_openai_state_dict(cls, sd: dict[str, torch.Tensor], source: str = CLIP_FILE) -> ClipImageEncoder:
        """Build from OpenAI CLIP names (`visual.*`); the shapes give the architecture."""

        def need(key: str) -> torch.Tensor:
            if key not in sd:
                raise CheckpointError(f"{source}: weight {key!r} is missing (not an OpenAI CLIP file?)")
            return sd[key].float()

        conv = need("visual.conv1.weight")  # (width, 3, patch, patch)
        width, patch = int(conv.shape[0]), int(conv.shape[-1])
        n_pos = int(need("visual.positional_embedding").shape[0])
        grid = round((n_pos - 1) ** 0.5)
        layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        proj = need("visual.proj")  # (width, D)
        if grid * grid + 1 != n_pos or layers == 0 or width % 64:
            raise CheckpointError(f"{source}: not a CLIP ViT ({n_pos} positions, {layers} blocks, width {width})")
        config = CLIPVisionConfig(  # type: ignore[call-arg]  # attn_implementation: a documented base-config kwarg
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=width // 64,
            image_size=grid * patch,
            patch_size=patch,
            projection_dim=int(proj.shape[1]),
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            attn_implementation="eager",
        )
        enc = cls(config, int(proj.shape[1]))
        r = _fp16_round  # the weights OpenAI's loader rounds through fp16
        out = {
            "vision.embeddings.patch_embedding.weight": r(conv),
            "vision.embeddings.class_embedding": need("visual.class_embedding"),
            "vision.embeddings.position_embedding.weight": need("visual.positional_embedding"),
            "vision.pre_layrnorm.weight": need("visual.ln_pre.weight"),
            "vision.pre_layrnorm.bias": need("visual.ln_pre.bias"),
            "vision.post_layernorm.weight": need("visual.ln_post.weight"),
            "vision.post_layernorm.bias": need("visual.ln_post.bias"),
            "proj.weight": r(proj).T.contiguous(),
        }
        for i in range(layers):
            src, dst = f"visual.transformer.resblocks.{i}.", f"vision.encoder.layers.{i}."
            wq, wk, wv = r(need(src + "attn.in_proj_weight")).chunk(3)
            bq, bk, bv = r(need(src + "attn.in_proj_bias")).chunk(3)
            for name, w, b in (("q_proj", wq, bq), ("k_proj", wk, bk), ("v_proj", wv, bv)):
                out[dst + f"self_attn.{name}.weight"], out[dst + f"self_attn.{name}.bias"] = w, b
            pairs = {
                "self_attn.out_proj": "attn.out_proj",
                "mlp.fc1": "mlp.c_fc",
                "mlp.fc2": "mlp.c_proj",
            }
            for d, s in pairs.items():
                out[dst + d + ".weight"], out[dst + d + ".bias"] = (
                    r(need(src + s + ".weight")),
                    r(need(src + s + ".bias")),
                )
            for d, s in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
                out[dst + d + ".weight"], out[dst + d + ".bias"] = need(src + s + ".weight"), need(src + s + ".bias")
        missing, unexpected = enc.load_state_dict(out, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise CheckpointError(
                f"{source}: CLIP weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return enc.eval()

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self.proj.weight
        hidden = self.vision(pixel_values=pixels.to(device=p.device, dtype=p.dtype)).last_hidden_state  # (B, 50, w)
        return self.proj(self.vision.post_layernorm(hidden)).float()

    def encode(self, img: object) -> torch.Tensor:
        """A decoded PIL image, or its `preprocess`ed (3, 224, 224) pixels -> (50, D) features."""
        if isinstance(img, torch.Tensor):
            return self(img[None])[0]
        return self(preprocess(img, int(cast(int, self.vision.config.image_size)))[None])[0]


def clip_cache_file() -> Path:
    """Where OpenAI's clip package keeps its download (Mini-Omni2 falls back to it)."""
    return Path(os.path.expanduser("~/.cache/clip")) / CLIP_FILE


Fetcher = Callable[[str, Path], None]


def _fetch_url(url: str, target: Path) -> None:
    import hashlib
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
    expected = url.split("/")[-2]
    if hashlib.sha256(tmp.read_bytes()).hexdigest() != expected:
        tmp.unlink()
        raise CheckpointError(f"{url}: SHA-256 mismatch")
    tmp.replace(target)


def load_clip(root: Path, fetch: Fetcher | None = None) -> ClipImageEncoder:
    """`<root>/ViT-B-32.pt`, else the clip package's cache, else OpenAI's download."""
    path = root / CLIP_FILE
    if not path.is_file():
        path = clip_cache_file()
        if not path.is_file():
            log.info("no %s in %s; downloading OpenAI's ViT-B/32", CLIP_FILE, root)
            try:
                (fetch or _fetch_url)(CLIP_URL, path)
            except Exception as e:
                raise CheckpointError(
                    f"CLIP weights not found ({root / CLIP_FILE}, {path}) and the download failed: {e}"
                ) from None
    return ClipImageEncoder.from_openai_state_dict(read_clip_state_dict(path), str(path))
