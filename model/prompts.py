"""Prompt construction for every Mini-Omni task (DESIGN.md section 2), as (B, 8, T) global ids.

Streams 0..6 are the audio layers, stream 7 the text. Whisper features replace the
audio-stream embeddings at positions 1..L (see `llm.Splice`); in Mini-Omni2's image task
the 50 CLIP features go to positions 1..50 and the Whisper features to 52..51+L.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from .layout import TokenLayout
from .llm import Splice


class Task(str, Enum):
    A1A2 = "a1a2"  # audio in, audio + text out, as upstream's two-row batch
    A1A2_SINGLE = "a1a2-single"  # audio in, audio + text out, one row
    A1T2 = "a1t2"  # audio in, text answer out
    T1A2 = "t1a2"  # text in, audio + text out
    T1T2 = "t1t2"  # text in, text out
    A1T1 = "a1t1"  # audio in, transcript out (ASR)
    IMAGE_A1A2 = "image-a1a2"  # Mini-Omni2: image + audio in, audio + text out, two-row batch

    @property
    def audio_in(self) -> bool:
        return self in (Task.A1A2, Task.A1A2_SINGLE, Task.A1T2, Task.A1T1, Task.IMAGE_A1A2)

    @property
    def audio_out(self) -> bool:
        return self in (Task.A1A2, Task.A1A2_SINGLE, Task.T1A2, Task.IMAGE_A1A2)

    @property
    def image_in(self) -> bool:
        return self is Task.IMAGE_A1A2


@dataclass(frozen=True)
class Prompt:
    task: Task
    ids: torch.Tensor  # (B, 8, T) global ids
    splices: tuple[Splice, ...] = ()
    audio_row: int = 0  # row whose audio logits are sampled
    text_row: int = 0  # row whose text logits are sampled

    @property
    def length(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])


def _streams(layout: TokenLayout, audio: Sequence[int], text: Sequence[int]) -> torch.Tensor:
    """One row: local audio ids (same on every layer, shifted per layer) + text ids -> (8, T)."""
    assert len(audio) == len(text)
    local = torch.tensor(list(audio), dtype=torch.long)
    rows = [local + layout.audio_shift(i) for i in range(layout.num_audio_layers)]
    rows.append(torch.tensor(list(text), dtype=torch.long))
    return torch.stack(rows)


def audio_in_row(layout: TokenLayout, n_frames: int, audio_last: int, text_last: int) -> torch.Tensor:
    """`_input_a, _pad_a x L, _eoa, audio_last` / `_input_t, _pad_t x L, _eot, text_last`."""
    audio = [layout.input_a, *[layout.pad_a] * n_frames, layout.eoa, audio_last]
    text = [layout.input_t, *[layout.pad_t] * n_frames, layout.eot, text_last]
    return _streams(layout, audio, text)


def image_audio_in_row(layout: TokenLayout, n_image: int, n_frames: int, audio_last: int) -> torch.Tensor:
    """Mini-Omni2's image task (DESIGN.md section 2): `_image, _pad_a x 50, _eoimage, _input_a,
    _pad_a x (L - 1), _pad_a, _eoa, audio_last` / `_pad_t` everywhere, then `_answer_t`."""
    audio = [layout.image, *[layout.pad_a] * n_image, layout.eoimage, layout.input_a]
    audio += [*[layout.pad_a] * n_frames, layout.eoa, audio_last]
    text = [*[layout.pad_t] * (len(audio) - 1), layout.answer_t]
    return _streams(layout, audio, text)


def text_in_row(layout: TokenLayout, text_ids: Sequence[int], audio_out: bool) -> torch.Tensor:
    n = len(text_ids)
    if audio_out:
        audio = [*[layout.pad_a] * (n + 2), layout.answer_a]
    else:
        audio = [layout.pad_a] * (n + 3)
    text = [layout.input_t, *text_ids, layout.eot, layout.answer_t]
    return _streams(layout, audio, text)


def build_prompt(
    task: Task,
    layout: TokenLayout,
    *,
    audio_features: torch.Tensor | None = None,
    text_ids: Sequence[int] | None = None,
    image_features: torch.Tensor | None = None,
) -> Prompt:
    """audio_features: (L, C) Whisper features of the user's audio (audio-in tasks);
    text_ids: tokenizer ids of the user's text (text-in tasks);
    image_features: (50, D) CLIP features of the user's image (image task)."""
    if task.image_in:
        if audio_features is None or image_features is None:
            raise ValueError(f"task {task.value} needs an image and audio")
        n_img, n = int(image_features.shape[0]), int(audio_features.shape[0])
        rows = [
            image_audio_in_row(layout, n_img, n, layout.answer_a),
            image_audio_in_row(layout, n_img, n, layout.pad_a),
        ]
        # The release splices the audio one slot further left than Mini-Omni: over `_input_a`.
        splices = (
            Splice(start=1, features=image_features[None].expand(2, -1, -1), adapter="vision"),
            Splice(start=n_img + 2, features=audio_features[None].expand(2, -1, -1)),
        )
        return Prompt(task, torch.stack(rows), splices, audio_row=0, text_row=1)
    if task.audio_in:
        if audio_features is None:
            raise ValueError(f"task {task.value} needs audio input")
        n = int(audio_features.shape[0])
        if task is Task.A1A2:
            rows = [
                audio_in_row(layout, n, layout.answer_a, layout.answer_t),
                audio_in_row(layout, n, layout.pad_a, layout.answer_t),
            ]
        elif task is Task.A1A2_SINGLE:
            rows = [audio_in_row(layout, n, layout.answer_a, layout.answer_t)]
        elif task is Task.A1T2:
            rows = [audio_in_row(layout, n, layout.pad_a, layout.answer_t)]
        else:  # A1T1
            rows = [audio_in_row(layout, n, layout.pad_a, layout.asr)]
        ids = torch.stack(rows)
        feats = audio_features[None].expand(len(rows), -1, -1)
        text_row = 1 if task is Task.A1A2 else 0
        return Prompt(task, ids, (Splice(start=1, features=feats),), audio_row=0, text_row=text_row)
    if text_ids is None:
        raise ValueError(f"task {task.value} needs text input")
    ids = text_in_row(layout, text_ids, audio_out=task.audio_out)[None]
    return Prompt(task, ids)
