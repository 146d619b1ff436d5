"""The checkpoint's text tokenizer (`tokenizer.json`, Hugging Face tokenizers)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

from .errors import CheckpointError


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, bos_id: int | None = None) -> None:
        self._tok = tokenizer
        self.bos_id = bos_id  # prepended only when tokenizer_config.json says add_bos_token

    @classmethod
    def from_dir(cls, directory: Path) -> TextTokenizer:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a valid tokenizers file: {e}") from None
        bos_id = None
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
            if config.get("add_bos_token"):
                bos = config.get("bos_token")
                bos = bos.get("content") if isinstance(bos, dict) else bos
                bos_id = tok.token_to_id(bos) if bos else None
                if bos_id is None:
                    raise CheckpointError(f"{config_path}: add_bos_token is set but bos_token {bos!r} is unknown")
        return cls(tok, bos_id)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        ids = list(self._tok.encode(text).ids)
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids this tokenizer knows; specials and unknown ids are skipped."""
        known = [i for i in ids if 0 <= i < self.vocab_size]
        return str(self._tok.decode(known))
