"""Learning-rate schedule and the AdamW optimizer, nanoGPT's recipe in optax."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import Config


def lr_schedule(cfg: Config, peak: float | None = None):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr.

    Step `it` (from 0) gets learning_rate * (it + 1) / (warmup_iters + 1) while warming up,
    exactly as nanoGPT's get_lr; decay_lr=False keeps learning_rate constant.
    lr_schedule_kind='trapezoid' holds learning_rate after the warmup and decays linearly to min_lr
    over the last cooldown_frac of lr_decay_iters instead of the cosine. `peak` replaces
    learning_rate (min_lr scaled alike): Muon's schedule is this one at muon_lr.
    """
    lr = cfg.learning_rate if peak is None else peak
    min_lr = cfg.min_lr * lr / cfg.learning_rate if cfg.learning_rate else cfg.min_lr
    warmup, decay = cfg.warmup_iters, cfg.lr_decay_iters
    cool_start = max(warmup, decay - round(cfg.cooldown_frac * decay))

    def schedule(it):
        it = jnp.asarray(it, jnp.float32)
        if not cfg.decay_lr:
            return jnp.full_like(it, lr)
        warm = lr * (it + 1) / (warmup + 1)
        if cfg.lr_schedule_kind == "trapezoid":
            ratio = jnp.clip((it - cool_start) / max(1, decay - cool_start), 0.0, 1.0)
            body = lr - ratio * (lr - min_lr)
        else:
            ratio = jnp.clip((it - warmup) / max(1, decay - warmup), 0.0, 1.0)
            body = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)
        return jnp.where(it < warmup, warm, jnp.where(it > decay, min_lr, body))

    return schedule


def lr_schedules(cfg: Config) -> dict:
    """Each optimizer's schedule by the name metrics use: lr (AdamW's), and lr_muon with optimizer=muon."""
    return {"lr": lr_schedule(cfg), **({"lr_muon": lr_schedule(cfg, cfg.muon_lr)} if cfg.optimizer == "muon" else {})}


def decay_mask(params):
    """Weight decay on matrices and embeddings (>= 2-D), not on biases and LayerNorm gains."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def muon_labels(params):
    """'muon' for the transformer blocks' 2-D weight matrices (h.*: attention and MLP kernels),
    'adamw' for everything else: embeddings and the head (2-D too), norms, biases, LoRA adapters."""
    def label(path, p):
        names = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        return "muon" if names[0] == "h" and names[-1] == "kernel" and p.ndim == 2 else "adamw"

    return jax.tree_util.tree_map_with_path(label, params)


NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the published quintic's (a, b, c)


def newton_schulz(g, steps: int = 5):
    """Muon's orthogonalisation of a matrix (in, out): scaled to unit Frobenius norm, then `steps`
    quintic iterations X <- aX + (b A + c A^2) X, A = X X^T, on the wide orientation (a matrix
    taller than wide is transposed and back, as published); in float32."""
    a, b, c = NS_COEFFS
    x = g.astype(jnp.float32)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (jnp.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return (x.T if tall else x).astype(g.dtype)


class MuonState(NamedTuple):
    mu: Any  # the momentum buffer, one per matrix


def scale_by_muon(beta: float, steps: int = 5) -> optax.GradientTransformation:
    """The published Muon direction (github.com/KellerJordan/Muon, muon_update): buf = lerp(buf, g,
    1 - beta); Nesterov u = lerp(g, buf, beta); newton_schulz(u) x sqrt(max(1, fan_out / fan_in))."""
    def init(params):
        return MuonState(mu=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        mu = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, state.mu, updates)
        u = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, mu, updates)
        out = jax.tree.map(lambda x: newton_schulz(x, steps) * max(1.0, x.shape[1] / x.shape[0]) ** 0.5, u)
        return out, MuonState(mu=mu)

    return optax.GradientTransformation(init, update)


def muon(cfg: Config) -> optax.GradientTransformation:
    """Muon for the blocks' matrices: the published direction (scale_by_muon), decoupled weight
    decay, and the learning rate on lr_schedule's shape at muon_lr. Not optax.contrib.muon: that one
    bias-corrects the momentum as Adam does (the published algorithm does not), and its
    Newton-Schulz (vmapped over a batch axis) ran 2x slower than this on the CPU; README "Time to
    quality" has the comparison."""
    return optax.chain(scale_by_muon(cfg.muon_momentum),
                       optax.add_decayed_weights(cfg.muon_weight_decay),
                       optax.scale_by_learning_rate(lr_schedule(cfg, cfg.muon_lr)))


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.optimizer == "muon":
        parts.append(optax.multi_transform({"muon": muon(cfg), "adamw": adamw}, muon_labels))
    else:
        parts.append(adamw)
    return optax.chain(*parts)
