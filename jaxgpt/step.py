"""Train state, loss, and the pure train / eval steps.

`make_train_step` returns `train_step(state, batch, key) -> (state, metrics)`, jit-compiled
once with the state donated. The model enters as (graphdef, params): `nnx.split` happens once
outside, `nnx.merge` inside the traced function, so no Python object graph is walked per call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgpt import lora
from jaxgpt.config import Config
from jaxgpt.model import ModelConfig, build_model
from jaxgpt.optim import lr_schedules, make_optimizer
from jaxgpt.quant import quantize


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (skipped non-finite ones included)
    params: Any  # the model's parameters as a nested dict of arrays (GPT-2 names)
    opt_state: Any
    first_nonfinite: jax.Array  # int32: the first step whose loss or gradient was not finite, or -1
    skipped: jax.Array  # int32: steps whose update was skipped because they were not finite
    # LoRA: the frozen base model's parameters (no gradient, no optimizer state, not checkpointed
    # with the run; QLoRA: its Linear kernels are quant.QTensors); {} when every parameter trains.
    # The model is lora.join(params, frozen).
    frozen: Any = dataclasses.field(default_factory=dict)


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy; logits (B, T, V) taken in float32, targets (B, T)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def init_state(model_cfg: ModelConfig, cfg: Config, key: jax.Array):
    """Builds the model and optimizer; returns (graphdef, TrainState, optimizer)."""
    model = build_model(model_cfg, key)
    graphdef, params = nnx.split(model, nnx.Param)
    # A plain nested dict of arrays: jit flattens it per call far faster than nnx Variables.
    params = nnx.to_pure_dict(params)
    optimizer = make_optimizer(cfg)
    return graphdef, state_from_params(params, optimizer, model_cfg.lora_rank > 0, model_cfg.base_quant), optimizer


def state_from_params(params, optimizer: optax.GradientTransformation, lora_only: bool = False,
                      quant: str = "") -> TrainState:
    """A train state at step 0 around given parameters (random or pretrained): fresh optimizer.
    lora_only: only the adapters train; the rest becomes the frozen base, its Linear kernels
    quantized when `quant` names a kind (QLoRA; also what abstract_state sees)."""
    params, frozen = lora.split(params) if lora_only else (params, {})
    if quant:
        frozen = jax.tree_util.tree_map_with_path(
            lambda path, x: quantize(x, quant) if lora.quantizable([k.key for k in path]) else x, frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      first_nonfinite=jnp.full((), -1, jnp.int32), skipped=jnp.zeros((), jnp.int32),
                      frozen=frozen)


def abstract_state(model_cfg: ModelConfig, cfg: Config):
    """Shapes and dtypes of the train state without allocating it (a restore target)."""
    out = {}

    def build(key):
        graphdef, state, optimizer = init_state(model_cfg, cfg, key)
        out.update(graphdef=graphdef, optimizer=optimizer)
        return state

    shapes = jax.eval_shape(build, jax.random.key(0))
    return out["graphdef"], shapes, out["optimizer"]


def model_loss(model, x, y, dropout_key=None, remat: str = "", masked: bool = False):
    """The mean loss of a model on inputs x and targets y (B, T): its `loss`, which for large
    logits never holds them whole (jaxgpt.head); the cross_entropy of its logits in value.
    masked (chat data): targets < 0 are not trained on; the mean is over the others."""
    if masked:
        return model.loss(x, y, dropout_key, remat=remat, masked=True)
    return model.loss(x, y, dropout_key, remat=remat)


def make_loss_fn(graphdef, remat: str = "", masked: bool = False) -> Callable:
    """loss_fn(params, x, y, dropout_key, frozen); remat: activation checkpointing of the blocks
    (jaxgpt.model.REMAT_POLICIES; '' = none), which changes memory and speed, not the result.
    masked: the batches are chat data (y = -1 where the loss mask is 0, see jaxgpt.data.get_batch)."""
    def loss_fn(params, x, y, dropout_key=None, frozen=None):
        model = nnx.merge(graphdef, lora.join(params, frozen) if frozen else params)
        return model_loss(model, x, y, dropout_key, remat, masked)

    return loss_fn


def advance_schedule(opt_state):
    """The optimizer state with the lr schedule's step count advanced by one, nothing else changed."""
    is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda s: s._replace(count=optax.safe_increment(s.count)) if is_schedule(s) else s,
                        opt_state, is_leaf=is_schedule)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, cfg: Config,
                    state_sharding=None, batch_sharding=None, out_sharding=None, masked: bool = False):
    """The train step for batches of shape (A, B, T), A = gradient_accumulation_steps.

    `key` is the run's dropout key; the step derives its own with fold_in(key, state.step)
    and one more fold_in per micro-batch. Gradients are averaged over the micro-batches.
    The key always reaches the model, which applies each dropout whose rate is above 0 (the
    model's `dropout`, and LoRA's `lora_dropout` on the adapters' inputs) and ignores it otherwise.
    masked: chat data, the loss over the assistant's tokens only (each micro-batch's mean over its own).
    metrics: the step's loss, each optimizer's learning rate (lr; lr_muon with optimizer=muon), the
    gradient's global norm (before clipping), first_nonfinite, and skipped (steps skipped so far).
    """
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, cfg.remat, masked))
    schedules = lr_schedules(cfg)

    def train_step(state: TrainState, batch, key):
        xs, ys = batch  # (A, B, T) each
        step_key = jax.random.fold_in(key, state.step)

        def micro(i, x, y):
            return grad_fn(state.params, x, y, jax.random.fold_in(step_key, i), state.frozen)

        if xs.shape[0] == 1:
            loss, grads = micro(0, xs[0], ys[0])
        else:
            def body(acc, inp):
                loss, grads = micro(*inp)
                return jax.tree.map(jnp.add, acc, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(xs.shape[0]), xs, ys))
            loss, grads = jax.tree.map(lambda t: t / xs.shape[0], (loss, grads))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state

        # a non-finite step leaves parameters and Adam's state as they were, but uses up its
        # iteration of the learning-rate schedule: step i always applies (and logs) lr_schedule(i)
        params, opt_state = jax.lax.cond(finite, update, lambda _: (state.params, advance_schedule(state.opt_state)),
                                         None)
        first_bad = jnp.where((state.first_nonfinite < 0) & ~finite, state.step, state.first_nonfinite)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        metrics = {"loss": loss, **{name: s(state.step) for name, s in schedules.items()}, "grad_norm": grad_norm,
                   "first_nonfinite": first_bad, "skipped": skipped}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, first_nonfinite=first_bad,
                             skipped=skipped), metrics

    if state_sharding is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(tracing_mesh(train_step, batch_sharding), donate_argnums=0,
                   in_shardings=(state_sharding, batch_sharding, None), out_shardings=(state_sharding, out_sharding))


def tracing_mesh(fn: Callable, sharding) -> Callable:
    """fn traced with the mesh of `sharding` (a NamedSharding, or None) as JAX's abstract mesh:
    what a kernel XLA cannot partition (splash attention) needs to be run per device with
    shard_map. Nothing else changes: the mesh's axes are Auto, so XLA still partitions the rest."""
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.size == 1:
        return fn

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def make_eval_step(graphdef, param_sharding=None, batch_sharding=None, out_sharding=None, frozen_sharding=None,
                   masked: bool = False):
    """eval_step(params, (x, y), frozen) -> mean loss, without dropout (frozen: the state's, {} without LoRA;
    masked: chat data, the mean over the assistant's tokens)."""
    loss_fn = make_loss_fn(graphdef, masked=masked)
    fn = lambda params, batch, frozen: loss_fn(params, *batch, None, frozen)
    if param_sharding is None:
        return jax.jit(fn)
    return jax.jit(tracing_mesh(fn, batch_sharding), in_shardings=(param_sharding, batch_sharding, frozen_sharding),
                   out_shardings=out_sharding)
