"""Datasets: prepare a corpus into train.bin / val.bin / meta.json, read them, sample batches.

    python -m jaxgpt.data --input input.txt --data_dir data/shakespeare_char

The token files are flat arrays (uint16, or uint32 for vocabularies over 65535) read
through np.memmap, so corpora larger than RAM work. `get_batch` is a pure function of a
PRNG key: the same key gives the same batch on the host or inside jit, on any device count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import UserError
from jaxgpt.tokenizer import CharTokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DOWNLOADS = {"shakespeare_char": SHAKESPEARE_URL}
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"input file not found: {path}; pass an existing text file with --input_file=PATH")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 first") from None
    if not text:
        raise UserError(f"{path} is empty; give a text corpus to train on")
    return text


def encode_chars(text: str, tok: CharTokenizer) -> np.ndarray:
    """Vectorised char encoding: the vocabulary is sorted by code point, so ids = ranks."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab = np.array([ord(c) for c in tok.chars], dtype=np.uint32)
    ids = np.searchsorted(vocab, codes)
    if not np.array_equal(vocab[np.minimum(ids, len(vocab) - 1)], codes):
        tok.encode(text)  # raises the error naming the unknown characters
    return ids.astype(token_dtype(tok.vocab_size))


def prepare(input_file: str, data_dir: str, verbose: bool = True) -> dict[str, Any]:
    """Tokenizes a text file with a char tokenizer; writes train.bin, val.bin (90% / 10%), meta.json."""
    text = read_text(input_file)
    tok = CharTokenizer.from_text(text)
    ids = encode_chars(text, tok)
    n = int(0.9 * len(ids))
    os.makedirs(data_dir, exist_ok=True)
    parts = {"train": ids[:n], "val": ids[n:]}
    for split, arr in parts.items():
        arr.tofile(os.path.join(data_dir, f"{split}.bin"))
    meta = {**tok.meta(), "dtype": str(ids.dtype), "source": os.path.abspath(input_file),
            "train_tokens": int(len(parts["train"])), "val_tokens": int(len(parts["val"]))}
    with open(os.path.join(data_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False)
    if verbose:
        print(f"prepared {data_dir}: vocab {tok.vocab_size}, train {meta['train_tokens']:,} tokens, "
              f"val {meta['val_tokens']:,} tokens")
    return meta


def is_prepared(data_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(data_dir, f)) for f in ("meta.json", "train.bin", "val.bin"))


def download(url: str, path: str) -> None:
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"could not download {url} ({getattr(e, 'reason', e)}); "
                        f"pass a local copy with --input_file=PATH") from None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(body)
    os.replace(tmp, path)


def ensure_prepared(data_dir: str, dataset: str, input_file: str = "") -> dict[str, Any]:
    """Returns meta.json of data_dir, preparing it first from input_file or a download if needed."""
    if not is_prepared(data_dir):
        if not input_file:
            if dataset not in DOWNLOADS:
                raise UserError(f"no prepared data in {data_dir} and no input_file; pass --input_file=PATH "
                                f"or prepare it with python -m jaxgpt.data --input FILE --data_dir {data_dir}")
            input_file = os.path.join(data_dir, "input.txt")
            if not os.path.isfile(input_file):
                download(DOWNLOADS[dataset], input_file)
        prepare(input_file, data_dir)
    return load_meta(data_dir)


def load_meta(data_dir: str) -> dict[str, Any]:
    with open(os.path.join(data_dir, "meta.json"), encoding="utf-8") as f:
        return json.load(f)


def load_split(data_dir: str, split: str, meta: dict[str, Any]) -> np.ndarray:
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.dtype(meta["dtype"]), mode="r")


def batch_offsets(key: jax.Array, n_tokens: int, batch_size: int, block_size: int) -> jax.Array:
    """Start offsets (B,) of the windows of one batch: the one source of batch randomness."""
    return jax.random.randint(key, (batch_size,), 0, n_tokens - block_size)


def get_batch(key: jax.Array, data, batch_size: int, block_size: int):
    """Samples `batch_size` random windows; returns (x, y) of shape (B, T), y = x shifted by one.

    `data` is a jax array (pure, usable inside jit) or a numpy array / memmap (the offsets come
    from the same key, the windows are read on the host). Both give the same batch for a key.
    """
    offsets = batch_offsets(key, data.shape[0], batch_size, block_size)  # (B,)
    if isinstance(data, jax.Array):
        idx = offsets[:, None] + jnp.arange(block_size + 1)  # (B, T+1)
        chunk = data[idx].astype(jnp.int32)
    else:
        offsets = np.asarray(offsets)
        idx = offsets[:, None] + np.arange(block_size + 1)
        chunk = np.asarray(data[idx]).astype(np.int32)
    return chunk[:, :-1], chunk[:, 1:]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Prepare a text corpus for jaxgpt (char tokenizer).")
    p.add_argument("--input", required=True, help="UTF-8 text file")
    p.add_argument("--data_dir", required=True, help="where to write train.bin, val.bin, meta.json")
    a = p.parse_args(argv)
    try:
        prepare(a.input, a.data_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
