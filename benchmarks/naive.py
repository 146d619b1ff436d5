"""The baseline: a plain re-implementation of upstream Mini-Omni's per-step procedure.

Kept as the reference point for `omnivox bench compare`. Like upstream's generate
functions it computes the whole 181120-id head for every row at every step, samples each
of the 8 slices separately from Python lists, rebuilds the 8 input streams as separate
tensors each step and keeps computing text after it ended. Same weights and the same math
as `model.decoding.Generation` (so greedy tokens are identical), none of its shortcuts.
"""

from __future__ import annotations

import torch

from model.llm import OmniLM
from model.prompts import Prompt


@torch.inference_mode()
def naive_a1a2(model: OmniLM, prompt: Prompt, steps: int) -> list[list[int]]:
    """The two-row A1->A2 batch for exactly `steps` steps (no stop rules); returns 8 token lists."""
    lay = model.layout
    n_audio = lay.num_audio_layers
    cache = model.new_cache()
    out: list[list[int]] = [[] for _ in range(n_audio + 1)]
    ids = prompt.ids.to(model.device)
    embeds = model.embed(ids, prompt.splices)
    pos = 0
    for step in range(steps):
        h = model.hidden(embeds, cache, pos)[:, -1]  # (2, C)
        logits = model.full_logits(h)  # every id, every row: what upstream computes
        audio_tokens = []
        for i in range(n_audio):
            start = lay.audio_shift(i)
            audio_tokens.append(int(torch.argmax(logits[0, start : start + lay.padded_audio_vocab_size])))
        text = int(torch.argmax(logits[1, : lay.padded_text_vocab_size]))
        for i, a in enumerate(audio_tokens):
            out[i].append(a)
        out[n_audio].append(text)
        streams = []
        for i in range(n_audio):
            streams.append(torch.tensor([[audio_tokens[i] + lay.audio_shift(i)], [lay.pad_a + lay.audio_shift(i)]]))
        streams.append(torch.tensor([[text], [text]]))
        next_ids = torch.stack(streams, dim=1).to(model.device)  # (2, 8, 1)
        pos = prompt.length if step == 0 else pos + 1
        embeds = model.embed(next_ids)
    return out
