"""Quantized frozen weights for QLoRA: NF4 (4-bit NormalFloat) and int8 Linear kernels.

    q = quantize(kernel)                  # (C_in, C_out) float -> QTensor, packed
    y = qdense(x, q, bias)                # x (..., C_in) @ dequantize(q) + bias, inside jit
    base = quantize_tree(params, lambda path, x: path[-1] == "kernel")

A QLoRA run keeps the base model frozen and quantized and trains float32 adapters beside it
(jaxgpt/lora.py); the base is dequantized inside the jitted step, one matmul at a time: qdense
decodes a kernel just before its forward matmul and again just before its backward one, so a
step holds one decoded kernel at a time, not a float copy of the base. Which leaves to quantize
is the caller's `select`: for GPT-2, the blocks' Linear kernels; the embeddings (wte is also
the tied output head), LayerNorms and biases stay float32.

Layout. A kernel is (C_in, C_out), as in nnx.Linear and GPT-2's Conv1D: y = x @ W. It is cut
into blocks of `block` consecutive rows, i.e. along C_in, the dimension the matmul contracts
over, and every (block, column) pair has its own scale: scale (C_in / block, C_out). That is
the grouping of bitsandbytes (it blocks a torch (C_out, C_in) weight along its rows, so also
along C_in) and it keeps dequantization cheap: restoring W is a reshape to
(C_in / block, block, C_out) and one broadcast multiply, and a fused kernel could even apply
the scale to each block's partial dot product. Sharding W along C_out (column parallel)
splits codes and scales alike; along C_in it does too when a shard is a whole number of blocks.

NF4 (Dettmers et al. 2023, "QLoRA", appendix E): each value w in a block becomes the index of
the codebook entry nearest to w / absmax(block), 4 bits; ties (w / absmax exactly halfway
between two entries) go to the lower entry, as in bitsandbytes' strict `x > midpoint` tests.
The codebook holds -1, 0 and +1, so zeros and the block's largest |w| come back exactly.
Two codes share a byte: row 2i of the kernel in the low nibble, row 2i + 1 in the high one,
so a shard along C_in at an even row keeps its bytes whole.
Scales are float32, one per 64 values: 4 + 32 / 64 = 4.5 bits per parameter, within the 4.5
bits QLoRA asks of jaxgpt. (bfloat16 scales would give 4.25 bits but lose the exact absmax;
double quantization 4.127 bits, for a second table of scales; neither is needed.)

int8: symmetric absmax, by default one scale per output column (block = C_in): codes in
[-127, 127], scale = absmax / 127, error at most absmax / 254 per element, 8 + 32 / C_in bits.

C_in need not be a multiple of the block: the kernel is padded with zero rows to the next
multiple (zeros change no absmax and decode to exactly zero) and dequantize drops them again.
Kernels must be 2-D.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
Path = tuple[Any, ...]  # a leaf's keys in a nested dict, e.g. ("h", "0", "mlp", "c_fc", "kernel")

# The 16 NF4 values: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero (QLoRA paper,
# appendix E; bitsandbytes' functional.get_4bit_type("nf4")), written exactly as published.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
# the decision boundaries between neighbouring entries
NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2

KINDS = ("nf4", "int8")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale"],
                   meta_fields=["kind", "shape", "block"])
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantized (C_in, C_out) kernel: a pytree of two plain arrays (jit, device_put with a
    sharding and checkpointing see only those); kind, shape and block are static metadata.

    nf4:  codes uint8 (C_pad / 2, C_out), two 4-bit codebook indices per byte; scale float32
          (C_pad / block, C_out), each block's absmax.
    int8: codes int8 (C_pad, C_out); scale float32 (C_pad / block, C_out), absmax / 127.
    C_pad is C_in rounded up to a multiple of block; shape is the original (C_in, C_out)."""
    codes: jax.Array
    scale: jax.Array
    kind: str
    shape: tuple[int, int]
    block: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])


def quantize(w, kind: str = "nf4", block: int | None = None) -> QTensor:
    """Quantizes a (C_in, C_out) kernel (numpy or jax, any float dtype); usable inside jit.

    block: rows of C_in per scale; default 64 for nf4, C_in (one scale per column) for int8.
    C_in is padded with zero rows to a multiple of block (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}; expected one of {KINDS}")
    if np.ndim(w) != 2:
        raise ValueError(f"quantize takes a 2-D (C_in, C_out) kernel, got shape {np.shape(w)}")
    c_in, c_out = np.shape(w)
    block = block or (64 if kind == "nf4" else c_in)
    if block < 1 or (kind == "nf4" and block % 2):
        raise ValueError(f"block must be a positive{' even' if kind == 'nf4' else ''} number of rows, got {block}")
    codes, scale = _quantize(w, kind, block)
    return QTensor(codes, scale, kind, (c_in, c_out), block)


@functools.partial(jax.jit, static_argnames=("kind", "block"))
def _quantize(w, kind, block):
    c_in, c_out = w.shape
    w = jnp.pad(w.astype(F32), ((0, -c_in % block), (0, 0)))  # (C_pad, C_out)
    wb = w.reshape(-1, block, c_out)  # (n_blocks, block, C_out)
    absmax = jnp.max(jnp.abs(wb), axis=1)  # (n_blocks, C_out)
    if kind == "nf4":
        scale = jnp.where(absmax > 0, absmax, 1.0)  # an all-zero block: codes of 0, any scale
        u = wb / scale[:, None, :]  # in [-1, 1]; the block's absmax element is exactly +-1
        # the nearest entry's index = how many boundaries lie strictly below u (ties: the lower)
        codes = jnp.searchsorted(jnp.asarray(NF4_MIDPOINTS), u, side="left", method="compare_all")
        codes = codes.astype(jnp.uint8).reshape(-1, 2, c_out)  # (C_pad / 2, 2, C_out): row pairs
        return codes[:, 0] | (codes[:, 1] << 4), scale
    scale = jnp.where(absmax > 0, absmax / 127, 1.0)
    codes = jnp.clip(jnp.round(wb / scale[:, None, :]), -127, 127).astype(jnp.int8)
    return codes.reshape(-1, c_out), scale


def dequantize(q: QTensor, dtype=F32, *, after: jax.Array | None = None) -> jax.Array:
    """The (C_in, C_out) kernel in `dtype`: unpack, look up, scale. Inside jit, XLA fuses this
    into the passes that feed the matmul.

    after: an array that must exist before the kernel is decoded (qdense passes the matmul's
    input). The decode depends on nothing but parameters, so without it XLA:CPU's scheduler
    hoists every layer's decode to the start of the step, and shares each between the forward
    and backward passes: all the layers' kernels, in `dtype`, alive at once. The tie adds to
    the codes an integer 0 computed from after's first element, which XLA cannot fold away
    (a jax.lax.optimization_barrier, the documented tool, was measured to be dropped by XLA:CPU)."""
    c_in, c_out = q.shape
    codes = q.codes if after is None else q.codes + _zero_from(after, q.codes.dtype)
    if q.kind == "nf4":
        lo, hi = codes & 0xF, codes >> 4
        idx = jnp.stack([lo, hi], axis=1).reshape(-1, c_out)  # (C_pad, C_out), rows back in order
        vals = jnp.asarray(NF4)[idx]  # a gather from the 16-entry codebook
    else:
        vals = codes.astype(F32)
    w = vals.reshape(-1, q.block, c_out) * q.scale[:, None, :]  # (n_blocks, block, C_out)
    return w.reshape(-1, c_out)[:c_in].astype(dtype)


def _zero_from(t: jax.Array, dtype) -> jax.Array:
    """0 in `dtype`, computed from t's first element: 0 * t is 0, or NaN when t is inf or NaN,
    and XLA converts NaN to the integer 0 too, so the codes never change."""
    return (0.0 * t.reshape(-1)[0].astype(F32)).astype(dtype)


def qdense(x: jax.Array, q: QTensor, bias: jax.Array | None = None) -> jax.Array:
    """x (..., C_in) @ W + bias -> (..., C_out) in x's dtype, W = dequantize(q, x.dtype).

    W exists only for the matmuls that use it: decoded once in the forward pass, after x is
    ready, and once more in the backward pass, after the output's cotangent is ready, for
    dx = dy @ Wᵀ (see dequantize's `after`). W's own gradient is never formed: the base is
    frozen, so q gets a zero cotangent (the codes are integers; the scales' true gradient is
    not computed either)."""
    y = _qmatmul(x, q)
    return y if bias is None else y + bias.astype(y.dtype)


@jax.custom_vjp
def _qmatmul(x, q):
    return x @ dequantize(q, x.dtype, after=x)


def _qmatmul_fwd(x, q):
    return _qmatmul(x, q), q  # the residual is q itself: no copy of W outlives the forward pass


def _qmatmul_bwd(q, dy):
    return dy @ dequantize(q, dy.dtype, after=dy).T, None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def quantize_stream(items: Iterable[tuple[Path, Any]], select: Callable[[Path, Any], bool],
                    kind: str = "nf4", block: int | None = None) -> dict:
    """Builds a nested dict from (path, array) pairs, quantizing each array `select(path, array)`
    picks as it arrives; the others are kept as they are.

    Memory: only one float array is in flight at a time, so when `items` is a loader that reads
    tensors one by one (a safetensors file, a checkpoint), peak memory is the quantized tree
    plus one float layer and its transient copy, never the float model."""
    tree: dict = {}
    for path, x in items:
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        if select(path, x):
            # Wait for the result, so no float layer is still in use when the next one loads.
            # The explicit device_put is needed too: a numpy array handed straight to the jitted
            # quantizer was measured to stay referenced after its result was ready, in 13-29%
            # of calls, by the asynchronous dispatch.
            x = jax.device_put(x)
            node[path[-1]] = jax.block_until_ready(quantize(x, kind, block))
        else:
            node[path[-1]] = x
        del x  # drop the float layer before the loader produces the next
    return tree


def quantize_tree(params: dict, select: Callable[[Path, Any], bool], kind: str = "nf4",
                  block: int | None = None) -> dict:
    """A nested dict of arrays with the kernels `select` picks replaced by QTensors."""
    return quantize_stream(_flatten(params), select, kind, block)


def _flatten(tree: dict, prefix: Path = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v
