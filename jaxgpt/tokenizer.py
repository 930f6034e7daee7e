"""Tokenizers. `CharTokenizer`: the vocabulary is the sorted set of the corpus's characters.

A tokenizer round-trips through `meta()` (a JSON-able dict stored in meta.json and in
every checkpoint) so that sampling needs nothing but the checkpoint.
"""

from __future__ import annotations

from typing import Any, Sequence

from jaxgpt.config import UserError


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise UserError(f"text contains {len(unknown)} character(s) outside the vocabulary: {shown}; "
                            f"remove them or retrain on a corpus that has them") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def meta(self) -> dict[str, Any]:
        return {"tokenizer": self.kind, "vocab_size": self.vocab_size, "chars": self.chars}


def tokenizer_from_meta(meta: dict[str, Any]):
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    raise UserError(f"unknown tokenizer kind {kind!r} in metadata; this jaxgpt knows: char")
