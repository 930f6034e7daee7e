"""The two building blocks every model layer shares: inverted dropout and the Linear layer.

`Linear(x, dropout_key=None)` is the one call signature of every linear layer in the model;
a plain Linear ignores the key, `lora.LoRALinear` (a Linear with adapters) uses it for the
adapters' dropout. So the model never asks which kind of layer it holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.quant import QTensor, qdense


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when key is None or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Linear(nnx.Linear):
    """nnx.Linear (kernel (C_in, C_out), bias (C_out,)) applied to (..., C_in) as one 2-D matmul
    (N, C_in) @ (C_in, C_out). XLA's CPU backend differentiates a 2-D matmul far faster than one
    whose weight gradient contracts over two leading dims (B and T): 2.6x on the MLP of the
    laptop recipe."""

    def __call__(self, x, dropout_key=None):
        lead = x.shape[:-1]
        return self.forward_2d(x.reshape(-1, x.shape[-1]), dropout_key).reshape(*lead, -1)

    def forward_2d(self, x, dropout_key=None):
        """(N, C_in) -> (N, C_out)."""
        return self.base(x)

    def base(self, x):
        """x W + b with the layer's own weights. A QLoRA base holds a quantized kernel (a
        jaxgpt.quant.QTensor, put in place of the float one by the train state's frozen tree):
        qdense decodes it inside the matmul, in the layer's compute dtype."""
        kernel = self.kernel.get_value()
        if isinstance(kernel, QTensor):
            bias = None if self.bias is None else self.bias.get_value()
            return qdense(x.astype(self.dtype or x.dtype), kernel, bias)
        return nnx.Linear.__call__(self, x)
