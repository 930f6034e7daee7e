"""Remat and the memory check on 2 CPU devices under dp and fsdp; prints one JSON report.

Started by tests/test_memory.py as a subprocess: the device count is fixed before JAX starts."""

import dataclasses
import json
import os
import sys

import jax

jax.config.update("jax_platforms", "cpu")  # the CPU's devices, also on a machine with a GPU
jax.config.update("jax_num_cpu_devices", 2)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgpt import memory, parallel  # noqa: E402
from jaxgpt.config import parse_args  # noqa: E402
from jaxgpt.errors import UserError  # noqa: E402
from jaxgpt.model import model_config  # noqa: E402
from jaxgpt.start import run_keys  # noqa: E402
from jaxgpt.step import abstract_state, init_state, make_train_step  # noqa: E402


def setup(sharding: str, remat: str):
    cfg = parse_args(["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=8",
                      "--dropout=0.1", "--gradient_accumulation_steps=2", "--learning_rate=1e-2",
                      "--warmup_iters=2", "--lr_decay_iters=10", "--dtype=float32", f"--sharding={sharding}",
                      f"--remat={remat}"]).validate()
    mesh = parallel.make_mesh(cfg.sharding, cfg.mesh_shape)
    mcfg = model_config(cfg, 16, log=lambda s: None)
    graphdef, abstract, optimizer = abstract_state(mcfg, cfg)
    state_sh = parallel.state_shardings(abstract, mesh)
    keys = run_keys(cfg.seed)
    state = jax.jit(lambda k: init_state(mcfg, cfg, k)[1], out_shardings=state_sh)(keys["init"])
    step = make_train_step(graphdef, optimizer, cfg, state_sh, parallel.batch_sharding(mesh, 3),
                           parallel.replicated(mesh))
    return cfg, mesh, graphdef, optimizer, state, state_sh, step, keys


def losses(sharding: str, remat: str, steps: int = 3):
    cfg, mesh, graphdef, optimizer, state, state_sh, step, keys = setup(sharding, remat)
    # the step the memory check compiled is the one that runs
    os.environ.pop(memory.LIMIT_ENV, None)
    step = memory.checked_train_step(step, graphdef, optimizer, cfg, state, state_sh, mesh, keys["dropout"],
                                     log=lambda s: None)
    out = []
    for it in range(steps):
        x = jax.random.randint(jax.random.fold_in(keys["data"], it), (2, 8, 17), 0, 16)
        batch = jax.device_put((x[..., :-1], x[..., 1:]), parallel.batch_sharding(mesh, 3))
        state, m = step(state, batch, keys["dropout"])
        out.append(float(parallel.host_value(m["loss"])))
    return out


def refused_at(limit: int) -> bool:
    cfg, mesh, graphdef, optimizer, state, state_sh, step, keys = setup("dp", "")
    os.environ[memory.LIMIT_ENV] = str(limit)
    try:
        memory.checked_train_step(step, graphdef, optimizer, cfg, state, state_sh, mesh, keys["dropout"],
                                  log=lambda s: None)
        return False
    except UserError:
        return True
    finally:
        os.environ.pop(memory.LIMIT_ENV, None)


def main():
    report = {s: {r: losses(s, r) for r in ("", "block", "dots")} for s in ("dp", "fsdp")}
    cfg, mesh, *_, state, state_sh, step, keys = setup("dp", "")
    batch = jax.ShapeDtypeStruct((2, 8, 16), jnp.int32, sharding=parallel.batch_sharding(mesh, 3))
    one = memory.StepMemory.of(step.lower(state, (batch, batch), keys["dropout"]).compile()).total
    # each of the 2 devices needs `one`: a limit that holds one device's need but not two is refused
    lo, hi = refused_at(int(1.2 * one / memory.MEMORY_SHARE)), refused_at(int(2.5 * one / memory.MEMORY_SHARE))
    report["sharing_2_over_1"] = 2.0 if (lo and not hi) else 0.0
    print(json.dumps(report))


if __name__ == "__main__":
    main()
