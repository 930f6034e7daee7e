"""LoRA: train low-rank adapters on a frozen base model.

    python train.py --config configs/finetune_code_lora.py

`LoRALinear` is a Linear with adapters: A (C_in, r) and B (r, C_out), nnx.LoRAParam named lora_a
and lora_b beside the layer's own kernel and bias, so a LoRA model's parameter tree is the plain
model's plus those two leaves per adapted layer (GPT-2 names stay where they were, and
pretrained weights, checkpoints and export need no renaming). The frozen kernel is reached only
through `Linear.base`, the one place a quantized kernel (jaxgpt.quant's QTensor and qdense, for
QLoRA) would plug in.

The parameter tree is split in two: the adapters, which the optimizer trains, and the
frozen base, which has no gradient and no optimizer state and is never written to a LoRA run's
checkpoints. `merge` folds the adapters into the base weights: W + (alpha / r) A B, for sampling
and export.
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
        if not isinstance(tree, dict):
            return tree
        if "lora_a" in tree:
            delta = (jnp.asarray(tree["lora_a"], jnp.float32) @ jnp.asarray(tree["lora_b"], jnp.float32)) * scale
            return {k: (v + delta.astype(v.dtype) if k == "kernel" else v)
                    for k, v in tree.items() if k not in LORA_KEYS}
        return {k: fold(v) for k, v in tree.items()}

    return fold(params), dataclasses.replace(model_cfg, lora_rank=0)


def fingerprint(params) -> str:
    """A short digest of the base weights, stored with the adapters: resuming or sampling on a
    different base (a retrained out_dir, another file at the same path) is caught, not silent."""
    leaves = jax.tree.leaves(params)
    sums = [float(np.abs(np.asarray(x, np.float64)).sum()) for x in leaves]
    shapes = [tuple(np.shape(x)) for x in leaves]

    return hashlib.sha256(repr((shapes, [f"{s:.6e}" for s in sums])).encode()).hexdigest()[:16]


def count(tree) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def check_base(lora_base: dict[str, Any], base_params) -> dict[str, Any]:
    """A LoRA checkpoint's adapters only make sense on the exact base they were trained on."""
    if fingerprint(base_params) != lora_base["fingerprint"]:
        raise UserError(f"the base model at {lora_base['source']} is not the one these LoRA adapters were trained "
                        f"on (its weights changed); restore that base, or export a merged model from a run "
                        f"while its base is intact")
    return lora_base
