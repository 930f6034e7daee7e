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


# ---------------------------------------------------------------------------------------------
# Batches on the devices

# Token arrays up to this size are copied to the device once and batches are cut there,
# inside jit; larger corpora stay in the memmap and batches are read on the host.
RESIDENT_BYTES = 1 << 30


def make_batch_fn(tokens: np.ndarray, batch_size: int, block_size: int, accum: int,
                  sharding: NamedSharding) -> Callable:
    """batch(key, i) -> (x, y), each (accum, B, T) (or (B, T) with accum=0), from fold_in(key, i).

    The batch is the same on any number of devices; it is laid out with `sharding`. A corpus
    that fits is copied to the devices once and cut there, inside jit; a larger one stays in
    the memmap and each process reads only the rows of its own devices.
    """
    if tokens.shape[0] < block_size + 2:
        raise UserError(f"a data split has {tokens.shape[0]} tokens, fewer than block_size + 1 = "
                        f"{block_size + 1}; use a larger corpus or a smaller --block_size")
    n_micro = max(accum, 1)
    squeeze = (lambda t: t[0]) if accum == 0 else (lambda t: t)

    if tokens.nbytes <= RESIDENT_BYTES:
        dev = parallel.put(tokens, parallel.replicated(sharding.mesh))

        def cut(data, key, i):
            keys = jax.random.split(jax.random.fold_in(key, i), n_micro)
            xs, ys = jax.vmap(lambda k: get_batch(k, data, batch_size, block_size))(keys)
            return squeeze(xs), squeeze(ys)

        stacked = jax.jit(cut, out_shardings=(sharding, sharding))
        return lambda key, i: stacked(dev, key, i)

    n = tokens.shape[0]
    shape = (n_micro, batch_size, block_size) if accum else (batch_size, block_size)

    def host_batch(key, i):
        keys = jax.random.split(jax.random.fold_in(key, i), n_micro)
        offsets = np.stack([np.asarray(batch_offsets(k, n, batch_size, block_size)) for k in keys])
        offsets = offsets if accum else offsets[0]  # (A, B) or (B,)

        def rows(index, shift):  # the block of one device: read only its rows from the memmap
            starts = offsets[index[:-1]] + shift
            block = np.asarray(tokens[starts[..., None] + np.arange(block_size)]).astype(np.int32)
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
