"""The decoding engine: prefill the prompt once, then decode with a per-layer KV cache.

    engine = Engine(graphdef, params, block_size)
    result = engine.generate(prompt_ids, max_new_tokens=500, num_samples=5, temperature=0.8,
                             top_k=200, top_p=0.95, key=jax.random.key(1337))
    result.tokens  # (num_samples, max_new_tokens) numpy array

How it runs. The prompt is padded to a power-of-two bucket and prefilled in one pass, so
prompts of similar length share one compilation. Decoding runs in jit-compiled chunks of
`chunk` tokens (a lax.fori_loop), all samples of a batch at once; the host only dispatches
chunks, and reads them back when streaming or looking for a stop string.

Context past block_size. GPT has learned absolute positions, so a full cache cannot slide:
moving the window changes every token's position and so every cached key and value. When
the cache is full, the engine re-prefills it from the last `window_keep` tokens. With
`window_keep = block_size` (the default) every token is predicted from exactly the last
block_size tokens, as nanoGPT's crop does and as the uncached model gives; each token past
the window then costs one full-window forward pass. A smaller `window_keep` re-prefills only
once every (block_size - window_keep + 1) tokens, much cheaper, at the price of a context
that shrinks to window_keep tokens after each refill.

Randomness. Sample i of a batch draws the token at buffer index n with
fold_in(keys[i], n): a batch of samples equals the same samples generated one at a time
with their keys, and a seed fixes the output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import UserError


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float = 1.0) -> None:
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1 (or 0 for no limit), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def sample_token(key, logits, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0):
    """Draws one token from logits (V,) in float32. temperature 0 is greedy argmax; top_k keeps
    the k most likely tokens; top_p keeps the smallest set whose probability reaches top_p."""
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep_sorted = before < top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[..., order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1)


def bucket(n: int, cap: int) -> int:
    """The power of two >= n, at most cap (prompt lengths share compilations)."""
    return min(cap, 1 << max(0, n - 1).bit_length())


@dataclass
class Result:
    tokens: np.ndarray  # (num_samples, max_new_tokens)
    lengths: np.ndarray  # (num_samples,) tokens kept after a stop string
    seconds: float  # generation time, without compilation
    compile_seconds: float

    @property
    def tokens_generated(self) -> int:
        return int(self.tokens.shape[0] * self.tokens.shape[1])


class Engine:
    """Batched, jit-compiled generation with a KV cache for a model (GPT or Bigram).

    vocab_size: the tokenizer's vocabulary when the model's is padded (50304 for 50257 BPE
    tokens): the padded ids, which no text decodes to, are never sampled."""

    def __init__(self, graphdef, params, block_size: int, chunk: int = 32, vocab_size: int | None = None):
        self.graphdef, self.params, self.block_size, self.chunk = graphdef, params, block_size, chunk
        self.vocab_size = vocab_size
        self._compiled: dict = {}

    # -- the two compiled pieces -------------------------------------------------------------

    def _prefill_fn(self, N: int, L: int, Tb: int):
        graphdef, block = self.graphdef, self.block_size

        def prefill(params, buf, prompt_len):
            """Fills the cache from the last min(P, block) prompt tokens; returns the carry."""
            model = nnx.merge(graphdef, params)
            start = jnp.maximum(0, prompt_len - block)  # the window's first buffer index
            window = jax.lax.dynamic_slice(buf, (0, start), (N, Tb))  # (N, Tb), padded past P
            logits, cache = model.decode(window, model.init_cache(N, block), 0, last=prompt_len - 1 - start)
            return {"buf": buf, "cache": cache, "start": start, "n": prompt_len, "logits": logits}

        return prefill

    def _chunk_fn(self, N: int, temperature: float, top_k, top_p: float, keep: int):
        graphdef, block, chunk, V = self.graphdef, self.block_size, self.chunk, self.vocab_size

        def run_chunk(params, carry, keys):
            model = nnx.merge(graphdef, params)

            def refill(c):  # cache full: re-prefill from the last `keep` tokens
                start = c["n"] - keep + 1
                window = jax.lax.dynamic_slice(c["buf"], (0, start), (N, keep))  # (N, keep)
                logits, cache = model.decode(window, model.init_cache(N, block), 0, last=keep - 1)
                return logits, cache, start

            def extend(c):  # room left: one cached step at position n - start
                tok = jax.lax.dynamic_slice(c["buf"], (0, c["n"]), (N, 1))  # (N, 1)
                logits, cache = model.decode(tok, c["cache"], c["n"] - c["start"], last=0)
                return logits, cache, c["start"]

            def step(_, c):
                step_keys = jax.vmap(lambda k: jax.random.fold_in(k, c["n"]))(keys)
                logits = c["logits"] if V is None else c["logits"][:, :V]  # (N, V)
                tok = jax.vmap(lambda k, l: sample_token(k, l, temperature, top_k, top_p))(step_keys, logits)
                c = {**c, "buf": jax.lax.dynamic_update_slice(c["buf"], tok[:, None].astype(jnp.int32), (0, c["n"]))}
                logits, cache, start = jax.lax.cond(c["n"] - c["start"] < block, extend, refill, c)
                return {**c, "cache": cache, "start": start, "n": c["n"] + 1, "logits": logits}

            return jax.lax.fori_loop(0, chunk, step, carry)

        return run_chunk

    def _compile(self, name, static, fn, *args):
        """AOT-compiles once per signature and reports the compile time separately."""
        sig = (name, static) + tuple(jax.tree.map(lambda a: (a.shape, a.dtype) if hasattr(a, "shape") else a,
                                           jax.tree.leaves(args)))
        if sig not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[sig] = jax.jit(fn, donate_argnums=(1,) if name == "chunk" else ()).lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
        return self._compiled[sig]

    # -- the public call ---------------------------------------------------------------------

    def generate(self, prompt: list[int], *, max_new_tokens: int, num_samples: int = 1,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                 key: jax.Array | None = None, keys: jax.Array | None = None, window_keep: int = 0,
                 stop: list[int] | None = None, on_chunk: Callable[[np.ndarray], None] | None = None) -> Result:
        """Generates max_new_tokens tokens after `prompt` for each sample.

        keys: one PRNG key per sample, (num_samples,); or `key`, from which sample i gets
        fold_in(key, i). stop: token ids; a sample's tokens after its first occurrence are
        dropped (`lengths`) and generation ends early once every sample has stopped.
        on_chunk(tokens so far) is called after each decoded chunk (streaming).
        """
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        if not prompt:
            raise UserError("the prompt is empty; give at least one token (e.g. --start='\\n')")
        keep = window_keep or self.block_size
        if not 1 <= keep <= self.block_size:
            raise UserError(f"window_keep must be in 1..block_size ({self.block_size}), got {window_keep}")
        if keys is None:
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_samples))
        N, P = keys.shape[0], len(prompt)
        Pb = bucket(P, 1 << 30)  # buffer bucket for the prompt
        Tb = min(bucket(P, self.block_size), self.block_size) if P <= self.block_size else self.block_size
        n_chunks = -(-max_new_tokens // self.chunk)
        L = Pb + n_chunks * self.chunk
        buf = jnp.zeros((N, L), jnp.int32).at[:, :P].set(jnp.asarray(prompt, jnp.int32))
        self.compile_seconds = 0.0
        prefill_fn = self._prefill_fn(N, L, Tb)
        prefill = self._compile("prefill", (N, L, Tb), prefill_fn, self.params, buf, jnp.int32(P))
        carry = jax.eval_shape(prefill_fn, self.params, buf, jnp.int32(P))
        static = (N, float(temperature), top_k, float(top_p), keep)
        run_chunk = self._compile("chunk", static, self._chunk_fn(*static), self.params, carry, keys)

        t0 = time.perf_counter()
        carry = prefill(self.params, buf, jnp.int32(P))
        done = 0
        for _ in range(n_chunks):
            carry = run_chunk(self.params, carry, keys)
            done += self.chunk
            if on_chunk is not None or stop:
                new = np.asarray(carry["buf"][:, P:P + min(done, max_new_tokens)])
                if on_chunk is not None:
                    on_chunk(new)
                if stop and all(find_stop(row, stop) >= 0 for row in new):
                    break
        tokens = np.asarray(carry["buf"][:, P:P + max_new_tokens])
        seconds = time.perf_counter() - t0
        lengths = np.full(N, tokens.shape[1])
        if stop:
            for i, row in enumerate(tokens):
                at = find_stop(row, stop)
                lengths[i] = at if at >= 0 else len(row)
        return Result(tokens, lengths, seconds, self.compile_seconds)


def find_stop(row: np.ndarray, stop: list[int]) -> int:
    """Index of the first occurrence of the token sequence `stop` in row, or -1."""
    m = len(stop)
    for i in range(len(row) - m + 1):
        if list(row[i:i + m]) == stop:
            return i
    return -1


def generate(graphdef, params, prompt: list[int], *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
             key: jax.Array, block_size: int, window_keep: int = 0) -> np.ndarray:
    """One-call convenience: (num_samples, max_new_tokens) new token ids continuing `prompt`."""
    return Engine(graphdef, params, block_size).generate(
        prompt, max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
        top_k=top_k, top_p=top_p, key=key, window_keep=window_keep).tokens
