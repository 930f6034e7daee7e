"""Reading prepared data: meta.json, the token splits (np.memmap), and batches.

`get_batch` is a pure function of a PRNG key: the same key gives the same batch on the host or
inside jit, on any device count. `make_batch_fn` lays batches out on the mesh: cut on the
devices for a corpus that fits, else read from the memmap on the host and prefetched.
jaxgpt.prepare writes what this module reads.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxgpt import parallel
from jaxgpt.errors import UserError

SPLITS = ("train", "val")
# Token arrays up to this size are copied to the device once and batches are cut there,
# inside jit; larger corpora stay in the memmap and batches are read on the host.
RESIDENT_BYTES = 1 << 30


# What meta.json must hold, whatever the tokenizer: key -> type
META_TYPES = {"tokenizer": str, "vocab_size": int, "dtype": str}
TOKEN_DTYPES = ("uint16", "uint32")


def _redo(data_dir: str) -> str:
    return (f"delete {os.path.join(data_dir, 'meta.json')} and rerun with --input_file (or python -m jaxgpt.prepare "
            f"--input FILE --data_dir {data_dir}) to prepare it again")


def load_meta(data_dir: str) -> dict[str, Any]:
    """meta.json of a prepared data_dir, checked: a damaged or foreign file is one UserError
    naming it and how to prepare the data again."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir} is not a directory; pass the directory jaxgpt.prepare wrote")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: {data_dir} is not prepared; prepare it with python -m jaxgpt.prepare "
                        f"--input FILE --data_dir {data_dir} (or train with --input_file)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is damaged ({str(e).splitlines()[0][:80]}); {_redo(data_dir)}") from None
    problem = meta_problem(meta)
    if problem:
        raise UserError(f"{path} is damaged ({problem}); {_redo(data_dir)}")
    return meta


def meta_problem(meta: Any) -> str:
    """What is wrong with a meta.json's content, or '' when it is usable."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, typ in META_TYPES.items():
        if key not in meta:
            return f"no {key!r}"
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            return f"{key!r} is {meta[key]!r}, not {'an integer' if typ is int else 'a string'}"
    if meta["dtype"] not in TOKEN_DTYPES:
        return f"'dtype' is {meta['dtype']!r}, not one of {', '.join(TOKEN_DTYPES)}"
    if not 1 <= meta["vocab_size"] <= np.iinfo(np.dtype(meta["dtype"])).max + 1:
        return f"'vocab_size' {meta['vocab_size']} does not fit its dtype {meta['dtype']}"
    if meta["tokenizer"] == "char" and not (isinstance(meta.get("chars"), list)
                                            and len(meta["chars"]) == meta["vocab_size"]
                                            and all(isinstance(c, str) and len(c) == 1 for c in meta["chars"])):
        return "'chars' is not a list of vocab_size characters"
    return ""


def load_split(data_dir: str, split: str, meta: dict[str, Any]) -> np.ndarray:
    """The tokens of a split (np.memmap), checked against meta.json: a file cut short or of the
    wrong size, and (for a corpus that fits on the devices, which is read whole anyway) ids past
    the vocabulary, are one UserError naming the file."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; {_redo(data_dir)}")
    dtype = np.dtype(meta["dtype"])
    size = os.path.getsize(path)
    expected = meta.get(f"{split}_tokens")
    if size % dtype.itemsize or (isinstance(expected, int) and size != expected * dtype.itemsize):
        want = f"{expected:,} {dtype.name} tokens" if isinstance(expected, int) else f"whole {dtype.name} tokens"
        raise UserError(f"{path} has {size:,} bytes, not the {want} ({dtype.itemsize} bytes each) meta.json "
                        f"describes: it is damaged or cut short; {_redo(data_dir)}")
    if size == 0:
        raise UserError(f"{path} holds no tokens; use a larger corpus, then {_redo(data_dir)}")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if tokens.nbytes <= RESIDENT_BYTES:
        top = int(tokens.max())
        if top >= meta["vocab_size"]:
            raise UserError(f"{path} holds token id {top}, outside the vocabulary of {meta['vocab_size']} in "
                            f"meta.json: the files do not belong together; {_redo(data_dir)}")
    return tokens


def batch_offsets(key: jax.Array, n_tokens: int, batch_size: int, block_size: int, starts=None) -> jax.Array:
    """Start offsets (B,) of the windows of one batch: the one source of batch randomness. With
    `starts` (chat data: the allowed window starts, see load_chat_split) one of them, at random."""
    if starts is None:
        return jax.random.randint(key, (batch_size,), 0, n_tokens - block_size)
    i = jax.random.randint(key, (batch_size,), 0, starts.shape[0])
    return starts[i] if isinstance(starts, jax.Array) else jnp.asarray(starts[np.asarray(i)])


def get_batch(key: jax.Array, data, batch_size: int, block_size: int, mask=None, starts=None):
    """Samples `batch_size` random windows; returns (x, y) of shape (B, T), y = x shifted by one.

    `data` is a jax array (pure, usable inside jit) or a numpy array / memmap (the offsets come
    from the same key, the windows are read on the host). Both give the same batch for a key.
    Chat data: `mask` (the loss mask, as data) makes y -1 where the target is not trained on, and
    windows start at `starts`.
    """
    offsets = batch_offsets(key, data.shape[0], batch_size, block_size, starts)  # (B,)
    if isinstance(data, jax.Array):
        idx = offsets[:, None] + jnp.arange(block_size + 1)  # (B, T+1)
        chunk = data[idx].astype(jnp.int32)
        if mask is not None:
            return chunk[:, :-1], jnp.where(mask[idx][:, 1:] > 0, chunk[:, 1:], -1)
    else:
        offsets = np.asarray(offsets)
        idx = offsets[:, None] + np.arange(block_size + 1)
        chunk = np.asarray(data[idx]).astype(np.int32)
        if mask is not None:
            return chunk[:, :-1], np.where(np.asarray(mask[idx])[:, 1:] > 0, chunk[:, 1:], -1)
    return chunk[:, :-1], chunk[:, 1:]


def load_chat_split(data_dir: str, split: str, meta: dict[str, Any], block_size: int):
    """A chat split for training: (tokens, mask, starts, long) in memory, tokens and mask padded
    with block_size + 1 <|bos|> tokens (mask 0) so every window start has a whole window; `starts`
    and `long` (conversations longer than a window, split at user turns) as jaxgpt.chat.windows."""
    from jaxgpt.chat import windows

    tokens = load_split(data_dir, split, meta)
    path = os.path.join(data_dir, f"{split}_mask.bin")
    if not os.path.isfile(path) or os.path.getsize(path) != tokens.shape[0]:
        raise UserError(f"{path} is missing or not one byte per token of {split}.bin; {_redo(data_dir)}")
    mask = np.fromfile(path, dtype=np.uint8)
    starts, long = windows(np.asarray(tokens), meta, block_size)
    pad = block_size + 1
    tokens = np.concatenate([tokens, np.full(pad, meta["chat"]["ids"]["bos"], tokens.dtype)])
    return tokens, np.concatenate([mask, np.zeros(pad, np.uint8)]), starts, long


# ---------------------------------------------------------------------------------------------
# Batches on the devices


def make_batch_fn(tokens: np.ndarray, batch_size: int, block_size: int, accum: int,
                  sharding: NamedSharding, mask: np.ndarray | None = None, starts: np.ndarray | None = None) -> Callable:
    """batch(key, i) -> (x, y), each (accum, B, T) (or (B, T) with accum=0), from fold_in(key, i).

    The batch is the same on any number of devices; it is laid out with `sharding`. A corpus
    that fits is copied to the devices once and cut there, inside jit; a larger one stays in
    the memmap and each process reads only the rows of its own devices. Chat data (mask, starts:
    load_chat_split) gives y = -1 where the loss mask is 0 (see get_batch).
    """
    if tokens.shape[0] < block_size + 1:  # one window: block_size inputs and the target after them
        name = getattr(tokens, "filename", None) or "a data split"
        raise UserError(f"{name} has {tokens.shape[0]} tokens, fewer than block_size + 1 = "
                        f"{block_size + 1}; use a larger corpus or a smaller --block_size")
    n_micro = max(accum, 1)
    squeeze = (lambda t: t[0]) if accum == 0 else (lambda t: t)

    if tokens.nbytes <= RESIDENT_BYTES:
        repl = parallel.replicated(sharding.mesh)
        dev = parallel.put(tokens, repl)
        extra = () if mask is None else (parallel.put(mask, repl), parallel.put(starts, repl))

        def cut(data, key, i, *extra):
            keys = jax.random.split(jax.random.fold_in(key, i), n_micro)
            xs, ys = jax.vmap(lambda k: get_batch(k, data, batch_size, block_size, *extra))(keys)
            return squeeze(xs), squeeze(ys)

        stacked = jax.jit(cut, out_shardings=(sharding, sharding))
        return lambda key, i: stacked(dev, key, i, *extra)

    n = tokens.shape[0]
    shape = (n_micro, batch_size, block_size) if accum else (batch_size, block_size)

    def host_batch(key, i):
        keys = jax.random.split(jax.random.fold_in(key, i), n_micro)
        offsets = np.stack([np.asarray(batch_offsets(k, n, batch_size, block_size, starts)) for k in keys])
        offsets = offsets if accum else offsets[0]  # (A, B) or (B,)

        def rows(index, shift):  # the block of one device: read only its rows from the memmap
            first = offsets[index[:-1]] + shift
            block = np.asarray(tokens[first[..., None] + np.arange(block_size)]).astype(np.int32)
            if mask is not None and shift:
                block = np.where(np.asarray(mask[first[..., None] + np.arange(block_size)]) > 0, block, -1)
            return block[..., index[-1]]

        return tuple(parallel.global_batch_from_host(lambda idx, s=s: rows(idx, s), shape, sharding)
                     for s in (0, 1))
    return Prefetched(host_batch)


class Prefetched:
    """Reads batch i + 1 from the memmap in a background thread while step i runs."""

    def __init__(self, fn: Callable):
        from concurrent.futures import ThreadPoolExecutor

        self.fn, self.pool, self.ahead = fn, ThreadPoolExecutor(max_workers=1), None

    def __call__(self, key, i):
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] is key and ahead[1] == i:
            batch = ahead[2].result()
        else:
            batch = self.fn(key, i)
        self.ahead = (key, i + 1, self.pool.submit(self.fn, key, i + 1))
        return batch


if __name__ == "__main__":  # the command before jaxgpt.prepare existed: say where it went, not exit 0 doing nothing
    import sys

    print("error: jaxgpt.data has no command line; prepare a corpus with "
          "python -m jaxgpt.prepare --input FILE --data_dir DIR", file=sys.stderr)
    sys.exit(2)
