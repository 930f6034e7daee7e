"""Benchmark the training step of a config: ms/iter, tokens/s, compile time, memory, MFU.

    python bench.py --config configs/shakespeare_char_cpu.py [--key=value ...] [--steps=50]

Uses synthetic batches (no data needed); the model and optimizer are the config's.
"""

import json
import sys

import jax

from jaxgpt.benchmark import device_peak, flops_per_token, peak_memory_bytes, summarize, time_steps
from jaxgpt.config import UserError, parse_args
from jaxgpt.model import num_params
from jaxgpt.step import init_state, make_train_step
from jaxgpt.trainer import model_config


def main(argv):
    steps = 50
    rest = []
    for a in argv:
        if a.startswith("--steps="):
            steps = int(a.split("=", 1)[1])
        elif a.startswith("--vocab_size="):
            rest.append(a)
        else:
            rest.append(a)
    vocab = 65
    for a in list(rest):
        if a.startswith("--vocab_size="):
            vocab = int(a.split("=", 1)[1])
            rest.remove(a)
    try:
        cfg = parse_args(rest).validate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mcfg = model_config(cfg, vocab)
    graphdef, state, optimizer = init_state(mcfg, cfg, jax.random.key(cfg.seed))
    n = num_params(state.params)
    step = make_train_step(graphdef, optimizer, cfg)
    A, B, T = cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size

    @jax.jit
    def make_batch(i):
        idx = jax.random.randint(jax.random.fold_in(jax.random.key(0), i), (A, B, T + 1), 0, vocab)
        return idx[..., :-1], idx[..., 1:]

    peak, peak_src = device_peak(cfg.dtype)
    state, times, compile_s = time_steps(step, state, make_batch, jax.random.key(1), steps)
    res = summarize(times, A * B * T, flops_per_token(mcfg, n), peak)
    res.update(compile_s=compile_s, params=n, device=jax.devices()[0].device_kind,
               peak_memory_bytes=peak_memory_bytes(), peak_source=peak_src, dtype=cfg.dtype, steps=steps)
    print(f"device {res['device']}; peak {peak_src}")
    print(f"{res['ms_per_iter']:.2f} ms/iter (median of {steps}), {res['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {100 * res['mfu']:.1f}%, compile {compile_s:.1f} s, peak memory "
          + (f"{res['peak_memory_bytes'] / 2**20:.0f} MiB" if res["peak_memory_bytes"] else "not reported"))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
