"""A run's accelerator programs traced and lowered on any machine, without the accelerator.

    model_cfg = for_platform(model_cfg, cfg.dtype, cfg.attn_impl, "tpu")   # what the config resolves to there
    failures = check(programs(model_cfg, cfg), ["tpu"])                     # [] when every program lowers

jax.export lowers a jitted function for another platform ('cuda', 'tpu') on a CPU: the same tracing
and StableHLO lowering the device would run, so a dtype a kernel refuses, a shape that does not
trace, or a kernel for the wrong platform fails here, on every commit, instead of on a rented
device. What it cannot see: the device compiler's own work (XLA's GPU or TPU passes, Mosaic's
compilation of a Pallas kernel), memory on the device, and speed.

The programs of a run: the train step (what train.py compiles), the eval step, and the decoding
engine's prefill, extend and refill (jaxgpt.sampling); given a mesh of several (CPU) devices, the
sharded train and eval steps the trainer builds for it. cuDNN flash attention cannot be lowered
where cuDNN is not installed, so a 'cuda' check lowers XLA attention in its place (which
implementation a GPU picks is pick_attention's business and has its own tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt import parallel
from jaxgpt.config import Config
from jaxgpt.model import ModelConfig, build_model, with_attention
from jaxgpt.runtime import resolve_dtype
from jaxgpt.sampling import Engine
from jaxgpt.step import abstract_state, make_eval_step, make_train_step

PLATFORMS = ("cuda", "tpu")
DEVICE_PLATFORM = {"cuda": "gpu", "tpu": "tpu", "cpu": "cpu"}  # jax.export's names -> jax.devices()' names
PROGRAMS = ("train_step", "eval_step", "prefill", "extend", "refill")


def for_platform(model_cfg: ModelConfig, dtype: str, attn_impl: str, platform: str) -> ModelConfig:
    """model_cfg as a run asking for `dtype` and `attn_impl` gets it on `platform` ('cuda', 'tpu'):
    the dtype 'auto' resolves to there, and the attention pick_attention picks there (cuDNN granted
    by its probe, then swapped for XLA attention on 'cuda': see the module's docstring)."""
    device = DEVICE_PLATFORM[platform]
    m = dataclasses.replace(model_cfg, dtype=resolve_dtype(dtype, device))
    m = with_attention(m, attn_impl, log=lambda s: None, platform=device, probe=lambda dtype, head_size: None)
    return dataclasses.replace(m, attn_impl="xla") if m.attn_impl == "cudnn" else m


def programs(model_cfg: ModelConfig, cfg: Config, *, num_samples: int = 2, train: bool = True,
             mesh=None) -> dict[str, tuple[Callable, tuple]]:
    """name -> (jitted function, abstract arguments) of a run's programs at cfg's batch shape:
    the train step (cfg.gradient_accumulation_steps x batch_size x block_size; unless train=False,
    for a config that only evaluates), the eval step, and the decoding engine's prefill (a full
    window), extend and refill for num_samples samples (a LoRA model decodes merged, as sample.py
    loads it). Nothing is allocated: the arguments are shapes. With a `mesh` (jaxgpt.parallel's,
    of several devices) the train and eval steps are the sharded ones the trainer builds for it,
    and the single-device decoding programs are left out."""
    graphdef, state, optimizer = abstract_state(model_cfg, cfg)
    A, B, T = cfg.gradient_accumulation_steps, cfg.batch_size, model_cfg.block_size
    i32 = jnp.int32
    tokens = lambda *shape: jax.ShapeDtypeStruct(shape, i32)  # noqa: E731
    out: dict[str, tuple[Callable, tuple]] = {}
    steps: dict[str, Any] = {}
    if mesh is not None:
        sh, repl = parallel.state_shardings(state, mesh), parallel.replicated(mesh)
        steps["train"] = make_train_step(graphdef, optimizer, cfg, sh, parallel.batch_sharding(mesh, 3), repl)
        steps["eval"] = make_eval_step(graphdef, sh.params, parallel.batch_sharding(mesh, 2), repl, sh.frozen)
    if train:
        out["train_step"] = (steps.get("train") or make_train_step(graphdef, optimizer, cfg),
                             (state, (tokens(A, B, T),) * 2, jax.random.key(0)))
    out["eval_step"] = (steps.get("eval") or make_eval_step(graphdef), (state.params, (tokens(B, T),) * 2,
                                                                         state.frozen))
    if mesh is not None:
        return out

    sample_cfg = dataclasses.replace(model_cfg, lora_rank=0, base_quant="")  # adapters merged
    box: dict[str, Any] = {}

    def split():
        box["graphdef"], params = nnx.split(build_model(sample_cfg), nnx.Param)
        return nnx.to_pure_dict(params)

    params = jax.eval_shape(split)
    engine = Engine(box["graphdef"], params, T, vocab_size=model_cfg.vocab_size)
    N, L = num_samples, 2 * T  # a buffer longer than the window: extend until full, then refill
    prefill = engine._prefill_fn(N, T, T, False)
    pre_args = (params, tokens(N, L), i32(T), i32(0))
    carry = jax.eval_shape(prefill, *pre_args)
    keys = jax.random.split(jax.random.key(0), N)
    # per-row temperature, top_k, top_p (every branch of the sampler, as arrays: one program for all settings)
    settings = (jnp.full(N, 0.8, jnp.float32), jnp.full(N, 200, jnp.int32), jnp.full(N, 0.95, jnp.float32))
    out["prefill"] = (jax.jit(prefill), pre_args)
    out["extend"] = (jax.jit(engine._loop_fn("extend", N, 0)), (params, carry, keys, settings, i32(0), i32(1)))
    out["refill"] = (jax.jit(engine._loop_fn("refill", N, T)), (params, carry, keys, settings, i32(0), i32(1)))
    return out


def lower(fn: Callable, args: tuple, platform: str) -> jax.export.Exported:
    """fn traced and lowered for `platform` ('cuda', 'tpu', 'cpu') by jax.export."""
    return jax.export.export(fn, platforms=[platform])(*args)


def check(progs: dict[str, tuple[Callable, tuple]], platforms=PLATFORMS, what: str = "") -> list[str]:
    """Lowers every program for every platform; one line per failure, naming `what` (e.g. the
    config), the program and the platform, with the error's first lines. [] when all lower."""
    failures = []
    for name, (fn, args) in progs.items():
        for platform in platforms:
            try:
                lower(fn, args, platform)
            except Exception as e:  # noqa: BLE001 -- any failure to trace or lower is the finding
                msg = " ".join(str(e).split())[:400]
                failures.append(f"{what + ': ' if what else ''}{name} does not lower for {platform}: "
                                f"{type(e).__name__}: {msg}")
    return failures
