"""Runs the multi-device checks in a process with 8 CPU devices; prints one JSON report.

Started by tests/test_parallel.py as a subprocess, because the device count must be fixed
before JAX starts (the main test process keeps one device).
"""

import dataclasses
import json
import os
import sys
import tempfile

import jax

jax.config.update("jax_platforms", "cpu")  # the CPU's devices, also on a machine with a GPU
jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_corpus, tiny_args  # noqa: E402
from jaxgpt import parallel  # noqa: E402
from jaxgpt.config import parse_args  # noqa: E402
from jaxgpt.step import abstract_state, init_state, make_train_step  # noqa: E402
from jaxgpt.data import make_batch_fn  # noqa: E402
from jaxgpt.model import model_config  # noqa: E402
from jaxgpt.start import run_keys  # noqa: E402
from jaxgpt.trainer import train  # noqa: E402


def step_losses(sharding: str, mesh_shape: str, steps: int = 10, lora_rank: int = 0):
    """Per-step train losses of a tiny GPT (dropout and accumulation on) on a given mesh; with
    lora_rank, LoRA adapters train on a frozen (random) base that is sharded like parameters."""
    cfg = parse_args(["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=8",
                      "--dropout=0.1", "--gradient_accumulation_steps=2", "--learning_rate=1e-2",
                      "--warmup_iters=2", "--lr_decay_iters=10", f"--sharding={sharding}",
                      f"--mesh_shape={mesh_shape}"])
    mesh = parallel.make_mesh(cfg.sharding, cfg.mesh_shape)
    mcfg = dataclasses.replace(model_config(cfg, 16, log=lambda s: None), lora_rank=lora_rank)
    graphdef, abstract, optimizer = abstract_state(mcfg, cfg)
    state_sh = parallel.state_shardings(abstract, mesh)
    keys = run_keys(cfg.seed)
    state = jax.jit(lambda k: init_state(mcfg, cfg, k)[1], out_shardings=state_sh)(keys["init"])
    batch_sh = parallel.batch_sharding(mesh, 3)
    step = make_train_step(graphdef, optimizer, cfg, state_sh, batch_sh, parallel.replicated(mesh))
    rng = np.random.default_rng(0)  # a learnable stream: a cycle with 10% noise
    tokens = np.where(rng.random(5000) < 0.1, rng.integers(0, 16, 5000), np.arange(5000) * 7 % 16).astype(np.uint16)
    batches = make_batch_fn(tokens, cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps, batch_sh)
    losses = []
    for it in range(steps):
        state, m = step(state, batches(keys["data"], it), keys["dropout"])
        losses.append(float(parallel.host_value(m["loss"])))  # waits: CPU collectives stay in step
    per_device = parallel.bytes_per_device(state)
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    specs = {"/".join(str(getattr(k, "key", k)) for k in path): str(leaf.sharding.spec)
             for path, leaf in jax.tree_util.tree_leaves_with_path(state.params if not lora_rank else state.frozen)}
    return {"losses": losses, "max_bytes_per_device": max(per_device.values()), "total_bytes": total,
            "n_devices": int(mesh.devices.size), "param_specs": specs}


def val_losses(out_dir: str) -> list:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["val_loss"] for r in map(json.loads, f) if r["kind"] == "eval"]


def main():
    report = {"devices": len(jax.devices()), "steps": {}}
    for sharding, n in [("dp", 1), ("dp", 2), ("dp", 8), ("fsdp", 2), ("fsdp", 8)]:
        report["steps"][f"{sharding}{n}"] = step_losses(sharding, str(n))
    report["steps"]["hybrid2x4"] = step_losses("fsdp", "2x4")
    report["lora"] = {"one": step_losses("dp", "1", lora_rank=4), "fsdp4": step_losses("fsdp", "4", lora_rank=4)}

    tmp = tempfile.mkdtemp()
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(make_corpus())
    quiet = lambda s: None  # noqa: E731
    args = lambda name, **kw: parse_args(tiny_args(_P(tmp, name), corpus, **{
        "batch_size": 8, "n_embd": 32, "eval_interval": 10, "max_iters": 20, **kw}))
    # train.py's path, 20 steps: one device, then dp and fsdp over 4 devices
    for name, kw in [("one", {"mesh_shape": "1"}), ("dp4", {"sharding": "dp", "mesh_shape": "4"}),
                     ("fsdp4", {"sharding": "fsdp", "mesh_shape": "4"})]:
        train(args(name, **kw), log=quiet)
        report[f"val_{name}"] = val_losses(os.path.join(tmp, name, "out"))
    # a corpus too big for the devices (RESIDENT_BYTES = 0 here): each device's rows are read from the
    # memmap on the host, prefetched, on a 2x2 mesh (data x fsdp)
    import jaxgpt.data as data_lib
    import jaxgpt.start as run_lib

    resident, data_lib.RESIDENT_BYTES = data_lib.RESIDENT_BYTES, 0
    memmap = args("memmap", sharding="fsdp", mesh_shape="2x2")
    report["memmap_prefetched"] = isinstance(run_lib.setup(memmap, log=quiet).batches["train"], data_lib.Prefetched)
    train(memmap, log=quiet)
    data_lib.RESIDENT_BYTES = resident
    report["val_memmap_2x2"] = val_losses(os.path.join(tmp, "memmap", "out"))
    # an fsdp checkpoint of 4 devices resumes on 1, and on 2 in dp
    train(args("resume", sharding="fsdp", mesh_shape="4", max_iters=10), log=quiet)
    train(args("resume", mesh_shape="1", max_iters=15, eval_interval=5, init_from="resume"), log=quiet)
    train(args("resume", sharding="dp", mesh_shape="2", max_iters=20, eval_interval=5, init_from="resume"), log=quiet)
    report["val_resumed"] = val_losses(os.path.join(tmp, "resume", "out"))
    print("REPORT " + json.dumps(report))


class _P(str):
    """tiny_args wants a path with '/' joining (like pathlib); a str subclass is enough."""

    def __new__(cls, base, name):
        return super().__new__(cls, os.path.join(base, name))

    def __truediv__(self, other):
        return os.path.join(self, other)


if __name__ == "__main__":
    main()
