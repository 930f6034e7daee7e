"""Learning-rate schedule and the AdamW optimizer, nanoGPT's recipe in optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import Config


def lr_schedule(cfg: Config):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr.

    Step `it` (from 0) gets learning_rate * (it + 1) / (warmup_iters + 1) while warming up,
    exactly as nanoGPT's get_lr; decay_lr=False keeps learning_rate constant.
    """
    lr, min_lr = cfg.learning_rate, cfg.min_lr
    warmup, decay = cfg.warmup_iters, cfg.lr_decay_iters

    def schedule(it):
        it = jnp.asarray(it, jnp.float32)
        if not cfg.decay_lr:
            return jnp.full_like(it, lr)
        warm = lr * (it + 1) / (warmup + 1)
        ratio = jnp.clip((it - warmup) / max(1, decay - warmup), 0.0, 1.0)
        cos = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)
        return jnp.where(it < warmup, warm, jnp.where(it > decay, min_lr, cos))

    return schedule


def decay_mask(params):
    """Weight decay on matrices and embeddings (>= 2-D), not on biases and LayerNorm gains."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
