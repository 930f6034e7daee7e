"""LoRA: train low-rank adapters on a frozen base model.

    python train.py --config configs/finetune_code_lora.py

`LoRALinear` is a Linear with adapters: A (C_in, r) and B (r, C_out), nnx.LoRAParam named lora_a
and lora_b beside the layer's own kernel and bias, so a LoRA model's parameter tree is the plain
model's plus those two leaves per adapted layer (GPT-2 names stay where they were, and
pretrained weights, checkpoints and export need no renaming). The frozen kernel is reached only
through `Linear.base`, where a quantized kernel plugs in: for QLoRA the frozen base's Linear
kernels (`quantizable`) are jaxgpt.quant QTensors, decoded by qdense inside the step.

The parameter tree is split in two: the adapters, which the optimizer trains, and the
frozen base, which has no gradient and no optimizer state and is never written to a LoRA run's
checkpoints. `merge` folds the adapters into the base weights: W + (alpha / r) A B, for sampling
and export (a quantized W is dequantized first: the model a QLoRA run trained is that one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.errors import UserError
from jaxgpt.layers import Linear, dropout
from jaxgpt.quant import QTensor, dequantize

LORA_KEYS = ("lora_a", "lora_b")


class LoRALinear(Linear):
    """A Linear computing x W + b + (alpha / r) dropout(x) A B (rank r: (N, C_in) -> (N, r) ->
    (N, C_out)). A starts random and B zero, so a new adapter changes nothing.

    `path` names the layer (e.g. 'attn.c_attn'); the adapters' dropout key is the caller's key
    folded with a hash of it, so each layer draws its own mask and the model's own dropout
    streams stay as they are. Dropout applies whenever lora_dropout > 0 and a key is given,
    whatever the model's own dropout."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dropout: float,
                 path: str, rngs: nnx.Rngs, **linear_kwargs):
        super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
        self.lora_a = nnx.LoRAParam(nnx.initializers.lecun_normal()(rngs.params(), (in_features, rank)))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features)))
        self.lora_scale = alpha / rank
        self.lora_dropout = dropout
        self.key_id = zlib.crc32(path.encode()) & 0x7FFFFFFF

    def forward_2d(self, x, dropout_key=None):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, self.key_id)
        xa = dropout(x, self.lora_dropout, key) @ self.lora_a[...].astype(x.dtype)  # (N, r)
        return self.base(x) + (xa @ self.lora_b[...].astype(x.dtype)) * self.lora_scale


def split(params: dict) -> tuple[dict, dict]:
    """(adapters, base): the nested dict split by leaf name, each keeping the tree's shape."""
    adapters, base = {}, {}
    for k, v in params.items():
        if isinstance(v, dict):
            a, b = split(v)
            if a:
                adapters[k] = a
            if b:
                base[k] = b
        elif k in LORA_KEYS:
            adapters[k] = v
        else:
            base[k] = v
    return adapters, base


def join(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves (the inverse of split)."""
    out = dict(b)
    for k, v in a.items():
        out[k] = join(v, out[k]) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge(params: dict, model_cfg):
    """Folds every adapter into its kernel; returns (plain params, the ModelConfig without LoRA)."""
    scale = model_cfg.lora_alpha / max(model_cfg.lora_rank, 1)

    def fold(tree):
        if isinstance(tree, QTensor):
            return dequantize(tree)
        if not isinstance(tree, dict):
            return tree
        if "lora_a" in tree:
            tree = {k: fold(v) for k, v in tree.items()}
            delta = (jnp.asarray(tree["lora_a"], jnp.float32) @ jnp.asarray(tree["lora_b"], jnp.float32)) * scale
            return {k: (v + delta.astype(v.dtype) if k == "kernel" else v)
                    for k, v in tree.items() if k not in LORA_KEYS}
        return {k: fold(v) for k, v in tree.items()}

    return fold(params), dataclasses.replace(model_cfg, lora_rank=0, base_quant="")


def quantizable(path, x=None) -> bool:
    """The leaves a QLoRA base stores quantized: the blocks' Linear kernels (attn.c_attn,
    attn.c_proj, mlp.c_fc, mlp.c_proj, adapted or not): 85% of GPT-2-medium's weights. wte (also
    the tied output head), wpe, the LayerNorms and the biases stay float32, as the QLoRA paper
    keeps embeddings and head in 16 bits: an error there reaches every logit directly; the norms
    and biases are tiny."""
    return path[-1] == "kernel" and path[0] != "lm_head"  # a modern model's untied head stays float32 too


def leaf_stat(x) -> tuple[tuple[int, ...], float]:
    """What the fingerprint keeps of one float base leaf: its shape and the sum of |x|, in float64,
    summed over slices of 2^20 values (no float64 copy of a whole layer is ever made)."""
    flat = np.ravel(np.asarray(x))
    n = 1 << 20
    return tuple(np.shape(x)), float(sum(np.abs(flat[i:i + n].astype(np.float64)).sum() for i in range(0, flat.size, n)))


def fingerprint(params=None, stats=None) -> str:
    """A short digest of the (float) base weights, stored with the adapters: resuming or sampling on a
    different base (a retrained out_dir, another file at the same path) is caught, not silent.
    stats: the same tree of leaf_stat tuples, collected while a QLoRA base streams past (the float
    base is then never whole): both give the same digest for the same weights."""
    if stats is None:
        stats = jax.tree.map(leaf_stat, params)
    leaves = jax.tree.leaves(stats, is_leaf=lambda t: isinstance(t, tuple))
    shapes, sums = [tuple(s) for s, _ in leaves], [v for _, v in leaves]
    return hashlib.sha256(repr((shapes, [f"{s:.6e}" for s in sums])).encode()).hexdigest()[:16]


def count(tree) -> int:
    """Parameters in a tree; a quantized kernel counts its (C_in, C_out) weights, not its bytes."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda t: isinstance(t, QTensor))
    return sum(int(np.prod(x.shape if isinstance(x, QTensor) else np.shape(x))) for x in leaves)


def check_base(lora_base: dict[str, Any], base_params=None, digest: str | None = None) -> dict[str, Any]:
    """A LoRA checkpoint's adapters only make sense on the exact base they were trained on
    (digest: the base's fingerprint when it is already known)."""
    if (digest or fingerprint(base_params)) != lora_base["fingerprint"]:
        raise UserError(f"the base model at {lora_base['source']} is not the one these LoRA adapters were trained "
                        f"on (its weights changed); restore that base, or export a merged model from a run "
                        f"while its base is intact")
    return lora_base
