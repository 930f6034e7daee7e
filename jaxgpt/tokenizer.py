"""Tokenizers. `CharTokenizer`: the vocabulary is the sorted set of the corpus's characters.
`BPETokenizer`: GPT-2's byte-level BPE through tiktoken, from tiktoken's own GPT-2 files or
from a Hugging Face GPT-2 tokenizer directory (vocab.json + merges.txt).

A tokenizer round-trips through `meta()` (a JSON-able dict stored in meta.json and in
every checkpoint) so that sampling needs nothing but the checkpoint: the standard GPT-2
encoding is stored by name, any other BPE encoding is embedded whole.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
import tiktoken
import tiktoken.registry

from jaxgpt.errors import UserError

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer, as tiktoken writes it (possessive quantifiers, same splits as the
# original). data.py relies on its shape to cut large files where tokens cannot change.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
KINDS = ("char", "gpt2")
# byte-order marks, longest first (UTF-32-LE's starts with UTF-16-LE's) -> the codec that drops it
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def bom_encoding(head: bytes) -> str:
    """'utf-32', 'utf-8-sig' or 'utf-16' when `head` starts with that byte-order mark, else ''."""
    return next((enc for bom, enc in BOMS if head.startswith(bom)), "")


def decode_text(data: bytes, path: str) -> str:
    """Text of a file that says its encoding: UTF-8 with or without a byte-order mark, UTF-16 or
    UTF-32 with one. Anything else must be UTF-8; otherwise one UserError naming the file, the
    first bad byte and the fix."""
    enc = bom_encoding(data) or "utf-8"
    try:
        return data.decode(enc)
    except UnicodeDecodeError as e:
        name = enc.upper().replace("-SIG", "")
        raise UserError(f"{path} is not {name} text (bad byte at offset {e.start}); convert it to UTF-8 first") from None


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


class BPETokenizer:
    """Byte-level BPE over a `tiktoken.Encoding`. Special-token text in the input is encoded as
    plain text, so a corpus that mentions "<|endoftext|>" cannot inject document breaks."""

    kind = "gpt2"

    def __init__(self, encoding: tiktoken.Encoding):
        if EOT not in encoding.special_tokens_set:
            raise UserError(f"the BPE encoding {encoding.name!r} has no {EOT} token; "
                            f"use a GPT-2 style tokenizer that defines it")
        self.encoding = encoding
        # Only the very object tiktoken built from OpenAI's files is stored by name; any other
        # encoding, even one that happens to equal it, is embedded in the metadata.
        self.standard = encoding.name == "gpt2" and encoding is tiktoken.registry.ENCODINGS.get("gpt2")
        ids = frozenset(encoding._mergeable_ranks.values()) | frozenset(encoding._special_tokens.values())
        self._ids = None if len(ids) == encoding.n_vocab else ids  # where the ids have gaps: the valid ones

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array, without a Python list in between (the fast path for data)."""
        return self.encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, dropping ids the encoding does not have (a model trained from scratch pads
        its vocabulary, 50257 -> 50304) and replacing invalid UTF-8 (a sample cut mid-character)."""
        ids = [int(i) for i in ids]
        valid = [i for i in ids if 0 <= i < self.vocab_size and (self._ids is None or i in self._ids)]
        return self.encoding.decode(valid, errors="replace")

    def write_hf_files(self, directory: str) -> None:
        """Writes the encoding as a Hugging Face GPT-2 tokenizer: vocab.json (token -> id, tokens
        spelled in GPT-2's byte alphabet, special tokens included) and merges.txt ("#version: 0.2",
        then one "a b" merge per line in rank order)."""
        alphabet = bytes_to_unicode()
        spell = lambda t: "".join(alphabet[b] for b in t)  # noqa: E731
        ranks = self.encoding._mergeable_ranks
        vocab = {spell(t): r for t, r in ranks.items()}
        vocab.update(self.encoding._special_tokens)
        merges = [_merge_of(t, r, ranks) for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(dict(sorted(vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False)
        with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{spell(a)} {spell(b)}\n" for a, b in merges))

    def meta(self) -> dict[str, Any]:
        meta = {"tokenizer": self.kind, "encoding": self.encoding.name, "vocab_size": self.vocab_size,
                "eot": self.eot}
        if self.standard:
            return meta
        ranks: list[str | None] = [None] * self.vocab_size  # rank order; None where a special token sits
        for token, rank in self.encoding._mergeable_ranks.items():
            ranks[rank] = base64.b64encode(token).decode("ascii")
        return {**meta, "pat_str": self.encoding._pat_str, "ranks": ranks,
                "special_tokens": dict(self.encoding._special_tokens)}


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens BPE (restricted to lower ranks) reduces `token` to: its merges.txt line."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        found = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                 if ranks.get(parts[i] + parts[i + 1], rank) < rank]
        if not found:
            break
        i = min(found)[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise UserError(f"token {token!r} is not a merge of two lower-ranked tokens; this encoding cannot be "
                        f"written as a Hugging Face merges.txt")
    return parts[0], parts[1]


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding; its files are downloaded once and cached in $TIKTOKEN_CACHE_DIR."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' connection errors, a hash mismatch, a read-only cache ...
        raise UserError(f"could not download the GPT-2 BPE files ({type(e).__name__}); they are cached (in "
                        f"$TIKTOKEN_CACHE_DIR) after one run with network; or pass a Hugging Face GPT-2 directory "
                        f"holding vocab.json and merges.txt with --tokenizer_dir=DIR") from None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, as vocab.json and merges.txt spell tokens: bytes
    that are printable and not a space stand for themselves, the rest map to chr(256 + n)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def encoding_from_hf_dir(path: str) -> tiktoken.Encoding:
    """The encoding of a Hugging Face GPT-2 tokenizer directory (vocab.json + merges.txt).

    Token ids are vocab.json's, so a pretrained model's embedding rows line up. tiktoken ranks
    merges by the id of their result, which matches BPE's merge order only when the ids of the
    merged tokens grow with their line in merges.txt; that is checked, as are the 256 bytes.
    """
    files = {name: os.path.join(path, name) for name in ("vocab.json", "merges.txt")}
    missing = [name for name, f in files.items() if not os.path.isfile(f)]
    if missing:
        raise UserError(f"{path} has no {' or '.join(missing)}; pass a Hugging Face GPT-2 tokenizer directory "
                        f"(vocab.json + merges.txt) with --tokenizer_dir=DIR")

    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a GPT-2 byte-level BPE tokenizer: {why}")

    try:
        with open(files["vocab.json"], encoding="utf-8") as f:
            vocab = json.load(f)
        with open(files["merges.txt"], encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad(f"cannot read its files ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise bad("vocab.json is not a JSON object of token -> id")
    decoder = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token: str, where: str) -> bytes:
        try:
            return bytes(decoder[c] for c in token)
        except KeyError:
            raise bad(f"{where} spells {token!r} outside GPT-2's byte alphabet") from None

    ranks: dict[bytes, int] = {}
    for b, c in bytes_to_unicode().items():
        if c not in vocab:
            raise bad(f"vocab.json lacks the single-byte token {c!r} (byte {b})")
        ranks[bytes([b])] = vocab[c]
    last = -1
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise bad(f"merges.txt line {n} is not two tokens: {line!r}")
        merged = parts[0] + parts[1]
        if merged not in vocab:
            raise bad(f"merges.txt line {n} ({line!r}) makes a token that vocab.json lacks")
        token = to_bytes(merged, f"merges.txt line {n}")
        if token in ranks or vocab[merged] <= last:
            raise bad(f"merges.txt line {n} ({line!r}) is out of id order with vocab.json, which tiktoken needs")
        ranks[token], last = vocab[merged], vocab[merged]
    if EOT not in vocab:
        raise bad(f"vocab.json has no {EOT}")
    # Whatever else vocab.json holds cannot come out of a merge: special tokens, as <|endoftext|>.
    used = set(ranks.values())
    special = {tok: i for tok, i in vocab.items() if i not in used}
    if len(set(special.values())) != len(special):
        raise bad("vocab.json gives one id to several tokens")
    name = "hf:" + os.path.basename(os.path.normpath(os.path.abspath(path)))
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def load_bpe(tokenizer_dir: str = "") -> BPETokenizer:
    """The BPE tokenizer of a Hugging Face tokenizer directory, or tiktoken's GPT-2 without one."""
    if tokenizer_dir and not os.path.isdir(tokenizer_dir):
        raise UserError(f"tokenizer directory not found: {tokenizer_dir}; pass a directory holding "
                        f"vocab.json and merges.txt with --tokenizer_dir=DIR")
    return BPETokenizer(encoding_from_hf_dir(tokenizer_dir) if tokenizer_dir else gpt2_encoding())


def _bpe_from_meta(meta: dict[str, Any]) -> BPETokenizer:
    if "ranks" not in meta:
        if meta.get("encoding") != "gpt2":
            raise UserError(f"tokenizer metadata names the BPE encoding {meta.get('encoding')!r} without "
                            f"embedding it; this jaxgpt only knows 'gpt2' by name")
        tok = BPETokenizer(gpt2_encoding())
    else:
        try:
            ranks = {base64.b64decode(t): r for r, t in enumerate(meta["ranks"]) if t is not None}
            enc = tiktoken.Encoding(meta["encoding"], pat_str=meta["pat_str"], mergeable_ranks=ranks,
                                    special_tokens={s: int(i) for s, i in meta["special_tokens"].items()})
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the embedded BPE tokenizer in the metadata is damaged ({e!r}); "
                            f"prepare the data again") from None
        tok = BPETokenizer(enc)
    # a chat template's tokens (jaxgpt.chat) come after the encoding's: its size is the base's
    size = meta["chat"].get("base_vocab_size") if isinstance(meta.get("chat"), dict) else meta.get("vocab_size")
    if (tok.vocab_size, tok.eot) != (size, meta.get("eot")):
        raise UserError(f"the BPE files give {tok.vocab_size} tokens (end of text {tok.eot}) but the metadata "
                        f"says {size} ({meta.get('eot')}); use the tokenizer it was made with")
    return tok


def tokenizer_from_meta(meta: dict[str, Any]):
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "gpt2":
        return _bpe_from_meta(meta)
    raise UserError(f"unknown tokenizer kind {kind!r} in metadata; this jaxgpt knows: {', '.join(KINDS)}")


# Process-pool side of data.py's parallel preparation. It lives here, away from JAX, so that a
# worker process imports only tiktoken and numpy.
_worker_tok: BPETokenizer | None = None


def init_worker(tok: BPETokenizer) -> None:
    global _worker_tok
    _worker_tok = tok


def encode_pieces(pieces: Sequence[tuple[bytes, bool]], dtype: str, tok: BPETokenizer | None = None):
    """Tokens of UTF-8 `pieces` in order, the end-of-text token after each piece flagged as the end
    of a document. Returns an array of `dtype`, or (piece index, byte offset) of invalid UTF-8."""
    tok = tok or _worker_tok
    out = []
    for n, (raw, ends_doc) in enumerate(pieces):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return n, e.start
        out.append(tok.encode_array(text))
        if ends_doc:
            out.append(np.array([tok.eot], np.uint32))
    return np.concatenate(out).astype(dtype) if out else np.zeros(0, dtype)
