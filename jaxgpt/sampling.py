"""Token sampling and jit-compiled generation.

Sample i of a batch draws token t with fold_in(fold_in(key, i), t), so a batch of samples
equals the same samples generated one at a time, and a seed fixes the output.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import UserError


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1 (or 0 for no limit), got {top_k}")


def sample_token(key, logits, temperature: float = 1.0, top_k: int | None = None):
    """Draws one token from logits (V,) in float32; temperature 0 is greedy argmax."""
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@partial(jax.jit, static_argnames=("graphdef", "prompt_len", "max_new_tokens", "temperature", "top_k", "block_size"))
def _generate(graphdef, params, buf, keys, *, prompt_len, max_new_tokens, temperature, top_k, block_size):
    model = nnx.merge(graphdef, params)
    N, L = buf.shape
    W = min(block_size, L)  # window the model sees

    def body(t, buf):
        start = jnp.maximum(0, t - W)  # crop the context to the last W tokens
        window = jax.lax.dynamic_slice(buf, (0, start), (N, W))  # (N, W)
        logits = model(window)  # (N, W, V)
        last = jax.lax.dynamic_index_in_dim(logits, t - 1 - start, axis=1, keepdims=False)  # (N, V)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
        tok = jax.vmap(lambda k, l: sample_token(k, l, temperature, top_k))(step_keys, last)
        return jax.lax.dynamic_update_index_in_dim(buf, tok.astype(buf.dtype), t, axis=1)

    return jax.lax.fori_loop(prompt_len, prompt_len + max_new_tokens, body, buf)


def generate(graphdef, params, prompt: list[int], *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, key: jax.Array, block_size: int):
    """Returns (num_samples, max_new_tokens) new token ids continuing `prompt`."""
    check_sampling_args(max_new_tokens, temperature, top_k)
    if not prompt:
        raise UserError("the prompt is empty; give at least one token (e.g. --start='\\n')")
    P = len(prompt)
    L = max(P + max_new_tokens, block_size)
    buf = jnp.zeros((num_samples, L), jnp.int32).at[:, :P].set(jnp.asarray(prompt, jnp.int32))
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_samples))
    out = _generate(graphdef, params, buf, keys, prompt_len=P, max_new_tokens=max_new_tokens,
                    temperature=float(temperature), top_k=top_k, block_size=block_size)
    return out[:, P:P + max_new_tokens]
