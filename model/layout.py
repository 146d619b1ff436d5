"""The Mini-Omni token layout: one table for every id the model reads or writes.

The vocabulary is one padded space of 181120 ids:

    [0, 152000)                      text: tokenizer ids 0..151935, then text specials
    [152000 + 4160*i, +4160)         audio layer i (0..6): SNAC codes 0..4095, then audio specials

Audio ids are stored *local* (0..4159 inside a layer) everywhere in this code base and
turned into global ids only at the embedding, with `audio_global`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    padded_text_vocab_size: int = 152000
    padded_audio_vocab_size: int = 4160
    num_audio_layers: int = 7
    num_codes: int = 4096  # SNAC codebook size; audio local ids >= this are specials
    # Text specials, as offsets from `text_special_base` (= tokenizer vocab size 151936).
    text_special_base: int = 151936

    # ---- text specials (global ids) ----
    @property
    def eot(self) -> int:
        return self.text_special_base

    @property
    def pad_t(self) -> int:
        return self.text_special_base + 1

    @property
    def input_t(self) -> int:
        return self.text_special_base + 2

    @property
    def answer_t(self) -> int:
        return self.text_special_base + 3

    @property
    def asr(self) -> int:
        return self.text_special_base + 4

    # ---- audio specials (local ids inside each layer) ----
    @property
    def eoa(self) -> int:
        return self.num_codes

    @property
    def pad_a(self) -> int:
        return self.num_codes + 1

    @property
    def input_a(self) -> int:
        return self.num_codes + 2

    @property
    def answer_a(self) -> int:
        return self.num_codes + 3

    @property
    def split(self) -> int:
        return self.num_codes + 4

    @property
    def image(self) -> int:  # Mini-Omni2
        return self.num_codes + 5

    @property
    def eoimage(self) -> int:  # Mini-Omni2
        return self.num_codes + 6

    # ---- geometry ----
    @property
    def num_streams(self) -> int:
        """7 audio streams, then the text stream."""
        return self.num_audio_layers + 1

    @property
    def text_stream(self) -> int:
        return self.num_audio_layers

    @property
    def padded_vocab_size(self) -> int:
        return self.padded_text_vocab_size + self.num_audio_layers * self.padded_audio_vocab_size

    def audio_shift(self, layer: int) -> int:
        """Global id of local audio id 0 in `layer`."""
        return self.padded_text_vocab_size + self.padded_audio_vocab_size * layer

    def audio_global(self, local: int, layer: int) -> int:
        return local + self.audio_shift(layer)

    def audio_shifts(self, device: torch.device | None = None) -> torch.Tensor:
        """(7,) global offset of every audio layer, for vectorised shifting."""
        return torch.tensor(
            [self.audio_shift(i) for i in range(self.num_audio_layers)], dtype=torch.long, device=device
        )

    @property
    def audio_logits_range(self) -> tuple[int, int]:
        """Global ids covered by the 7 audio logit slices, in layer order."""
        return self.padded_text_vocab_size, self.padded_vocab_size

    def is_code(self, local: int) -> bool:
        return 0 <= local < self.num_codes
