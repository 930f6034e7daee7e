"""Benchmark the training step of a config: ms/iter, tokens/s, compile time, memory, MFU;
or, with --sample_tokens=N, sampling: tokens/s of the decoding engine for N new tokens.

    python bench.py --config configs/shakespeare_char_cpu.py [--key=value ...] [--steps=50] [--vocab_size=65]
    python bench.py --config configs/shakespeare_char_cpu.py --block_size=256 --sample_tokens=200 \
        [--num_samples=5] [--prompt_tokens=1] [--window_keep=0]
    python bench.py --config configs/shakespeare_char_cpu.py --profile=5:10   # a trace in out_dir/profile

Uses synthetic batches and random weights (no data needed: speed does not depend on the
values); the model and optimizer are the config's. Steps are counted as the training loop counts
them: step 0 compiles, step 1 warms up, steps 2 to steps + 1 are timed; --profile=START:STOP traces
steps START to STOP - 1 (their times include the profiler's overhead). For GPT-2 124M: --n_layer=12 --n_head=12
--n_embd=768 --block_size=1024 --vocab_size=50304 (dtype=auto computes in bfloat16 on GPUs and TPUs).
"""

import json
import sys
import time
from dataclasses import dataclass
from functools import partial

import jax
from flax import nnx

from jaxgpt import parallel
from jaxgpt.benchmark import device_peak, flops_per_token, peak_memory_bytes, sampling_speed, summarize, time_steps
from jaxgpt.config import INT32_MAX, Config, directory_to_write, group, parse_args, rng
from jaxgpt.cli import run_cli
from jaxgpt.memory import checked_train_step
from jaxgpt.model import build_model, model_config, num_params
from jaxgpt.monitor import Profiler
from jaxgpt.runtime import matmul_precision, resolve_dtype
from jaxgpt.sampling import Engine
from jaxgpt.step import abstract_state, init_state, make_train_step


_bench = group("bench.py")


@dataclass(frozen=True)
class BenchConfig(Config):
    """Benchmarks the training step of a config (synthetic batches, random weights: ms/iter, tokens/s, compile time,
    memory, MFU), or with --sample_tokens=N the decoding engine; every training key applies."""

    GROUPS = ("bench.py", *Config.GROUPS)
    steps: int = _bench(50, rng(1, 1_000_000), "timed train steps")
    warmup: int = _bench(2, rng(1, 1_000_000), "untimed train steps before them (the first compiles unless the "
                                               "memory check did)")
    vocab_size: int = _bench(65, rng(1, 1 << 22), "the model's vocabulary V (the data is synthetic)")
    sample_tokens: int = _bench(0, rng(0, INT32_MAX), "> 0: benchmark sampling this many new tokens instead")
    num_samples: int = _bench(5, rng(1, 1 << 20), "sampling: sequences decoded together")
    prompt_tokens: int = _bench(1, rng(1, 1 << 20), "sampling: the prompt's length")
    window_keep: int = _bench(0, rng(0, note="(0 means block_size)"), "sampling: tokens kept when the window is full")


def bench_main(argv):
    cfg = parse_args(argv, BenchConfig).validate(paths=False)  # bench writes nothing: paths are not checked...
    if cfg.profile:
        directory_to_write("out_dir", cfg.out_dir)  # ...but a profile, to out_dir/profile
    opts = {k: getattr(cfg, k) for k in ("vocab_size", "sample_tokens", "num_samples", "prompt_tokens", "window_keep")}
    if not cfg.sample_tokens:
        parallel.set_cpu_devices(cfg.cpu_devices)
        parallel.maybe_initialize_distributed()  # under a launcher: one job over all processes
    with matmul_precision(cfg.matmul_precision):
        return bench_sampling(cfg, opts) if cfg.sample_tokens else bench(cfg, cfg.steps, cfg.vocab_size, cfg.warmup)


def bench(cfg, steps: int, vocab: int, warmup: int = 2) -> int:
    mesh = parallel.make_mesh(cfg.sharding, cfg.mesh_shape)
    parallel.check_batch(mesh, cfg.batch_size)
    cfg = cfg.replace(dtype=resolve_dtype(cfg.dtype, mesh.devices.flat[0].platform))
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

    key = jax.random.key(1)
    compile_s = None
    if cfg.memory_check:  # refuses a step that does not fit; the step then runs from this compile
        t0 = time.perf_counter()
        step = checked_train_step(step, graphdef, optimizer, cfg, state, state_sh, mesh, key,
                                  log=print if jax.process_index() == 0 else (lambda s: None))
        compile_s = time.perf_counter() - t0
    peak, peak_src = device_peak("float32" if jax.devices()[0].platform == "cpu" else cfg.dtype, mesh.devices.flat)
    profiler = Profiler(cfg.profile if jax.process_index() == 0 else "", cfg.out_dir)
    state, times, first_s = time_steps(step, state, make_batch, key, steps, warmup, each=profiler.at)
    profiler.close()
    res = summarize(times, A * B * T, flops_per_token(mcfg, n), peak)
    # compile_s: lower + compile (the memory check's); without the check, the first step's time
    res.update(compile_s=first_s if compile_s is None else compile_s, first_step_s=first_s, remat=cfg.remat,
               params=n, device=jax.devices()[0].device_kind, devices=mesh.devices.size,
               sharding=cfg.sharding, processes=jax.process_count(),
               peak_memory_bytes=peak_memory_bytes(), peak_source=peak_src, dtype=cfg.dtype, steps=steps)
    if jax.process_index():  # one report for the job
        return 0
    print(f"device {res['device']} x {mesh.devices.size} ({cfg.sharding}), {jax.process_count()} process(es); "
          f"peak {peak_src}")
    print(f"{res['ms_per_iter']:.2f} ms/iter (median of {steps}), {res['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {100 * res['mfu']:.1f}%, compile {res['compile_s']:.1f} s, peak memory "
          + (f"{res['peak_memory_bytes'] / 2**20:.0f} MiB" if res["peak_memory_bytes"] else "not reported"))
    print(json.dumps(res))
    return 0


def bench_sampling(cfg, opts) -> int:
    mcfg = model_config(cfg, opts["vocab_size"])
    graphdef, params = nnx.split(build_model(mcfg, cfg.seed), nnx.Param)
    engine = Engine(graphdef, params, mcfg.block_size)
    prompt = [i % mcfg.vocab_size for i in range(opts["prompt_tokens"])]
    res = sampling_speed(engine, prompt, opts["sample_tokens"], opts["num_samples"],
                         temperature=0.8, top_k=200, window_keep=opts["window_keep"])
    res.update(device=jax.devices()[0].device_kind, params=num_params(params), block_size=mcfg.block_size,
               window_keep=opts["window_keep"] or mcfg.block_size)
    print(f"device {res['device']}; {res['params']:,} parameters, block_size {mcfg.block_size}")
    print(f"{res['num_samples']} samples x {res['new_tokens']} new tokens after {res['prompt_tokens']} prompt tokens: "
          f"{res['steady_tokens_per_s']:,.0f} tokens/s steady, {res['request_tokens_per_s']:,.0f} tokens/s for the "
          f"whole request ({res['request_seconds']:.3f} s), compile {res['compile_s']:.1f} s")
    print(json.dumps(res))
    return 0


def main(argv):
    return run_cli(bench_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
