"""Benchmark the training step of a config: ms/iter, tokens/s, compile time, memory, MFU.

    python bench.py --config configs/shakespeare_char_cpu.py [--key=value ...] [--steps=50] [--vocab_size=65]

Uses synthetic batches (no data needed); the model and optimizer are the config's. For GPT-2
124M: --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --vocab_size=50304 (dtype=auto computes
in bfloat16 on GPUs and TPUs).
"""

import json
import sys

from functools import partial

import jax

from jaxgpt import parallel
from jaxgpt.benchmark import device_peak, flops_per_token, peak_memory_bytes, summarize, time_steps
from jaxgpt.config import parse_args, run_cli
from jaxgpt.model import num_params
from jaxgpt.runtime import matmul_precision, resolve_dtype
from jaxgpt.step import abstract_state, init_state, make_train_step
from jaxgpt.trainer import model_config


def bench_main(argv):
    # bench.py's own flags; everything else is a training config flag
    opts = {"steps": 50, "vocab_size": 65}
    rest = []
    for a in argv:
        key = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if key in opts and "=" in a:
            opts[key] = int(a.split("=", 1)[1])
        else:
            rest.append(a)
    steps, vocab = opts["steps"], opts["vocab_size"]
    cfg = parse_args(rest).validate()
    parallel.set_cpu_devices(cfg.cpu_devices)
    with matmul_precision(cfg.matmul_precision):
        return bench(cfg, steps, vocab)


def bench(cfg, steps: int, vocab: int) -> int:
    mesh = parallel.make_mesh(cfg.sharding, cfg.mesh_shape)
    parallel.check_batch(mesh, cfg.batch_size)
    cfg.dtype = resolve_dtype(cfg.dtype, mesh.devices.flat[0].platform)
    mcfg = model_config(cfg, vocab)
    graphdef, abstract, optimizer = abstract_state(mcfg, cfg)
    state_sh = parallel.state_shardings(abstract, mesh)
    state = jax.jit(lambda k: init_state(mcfg, cfg, k)[1], out_shardings=state_sh)(jax.random.key(cfg.seed))
    n = num_params(state.params)
    batch_sh = parallel.batch_sharding(mesh, 3)
    step = make_train_step(graphdef, optimizer, cfg, state_sh, batch_sh, parallel.replicated(mesh))
    A, B, T = cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size

    @partial(jax.jit, out_shardings=(batch_sh, batch_sh))
    def make_batch(i):
        idx = jax.random.randint(jax.random.fold_in(jax.random.key(0), i), (A, B, T + 1), 0, vocab)
        return idx[..., :-1], idx[..., 1:]

    peak, peak_src = device_peak("float32" if jax.devices()[0].platform == "cpu" else cfg.dtype, mesh.devices.flat)
    state, times, compile_s = time_steps(step, state, make_batch, jax.random.key(1), steps)
    res = summarize(times, A * B * T, flops_per_token(mcfg, n), peak)
    res.update(compile_s=compile_s, params=n, device=jax.devices()[0].device_kind, devices=mesh.devices.size,
               sharding=cfg.sharding,
               peak_memory_bytes=peak_memory_bytes(), peak_source=peak_src, dtype=cfg.dtype, steps=steps)
    print(f"device {res['device']} x {mesh.devices.size} ({cfg.sharding}); peak {peak_src}")
    print(f"{res['ms_per_iter']:.2f} ms/iter (median of {steps}), {res['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {100 * res['mfu']:.1f}%, compile {compile_s:.1f} s, peak memory "
          + (f"{res['peak_memory_bytes'] / 2**20:.0f} MiB" if res["peak_memory_bytes"] else "not reported"))
    print(json.dumps(res))
    return 0


def main(argv):
    return run_cli(bench_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
