"""Training-step benchmark and MFU: what bench.py prints and train.py logs.

MFU = achieved FLOP/s / the device's peak. FLOPs per token follow the nanoGPT / PaLM
estimate 6 N + 12 L H hs T (N parameters without the position embedding, L layers, H heads,
hs head size, T block size); a step processes batch_size * block_size * accumulation tokens.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.model import ModelConfig

# bf16 dense peak FLOP/s by device kind (substring of jax's device_kind, lower case).
PEAK_FLOPS = [("h100", 989e12), ("h200", 989e12), ("a100", 312e12), ("v6 lite", 918e12), ("v6e", 918e12),
              ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12), ("v4", 275e12)]


def flops_per_token(cfg: ModelConfig, n_params: int, n_trainable: int | None = None) -> float:
    """Training FLOPs per token: 2 per parameter forward, 2 backward for the activations' gradient,
    2 more for the gradient of each trained weight (a frozen LoRA base skips those), plus attention."""
    n_trainable = n_params if n_trainable is None else n_trainable
    if cfg.model_type != "gpt":
        return 6.0 * n_params
    # without wpe (a lookup, no matmul; rope models have none); an untied head and SwiGLU's third
    # matrix are in n_params like any other weight
    n = n_params - (cfg.block_size * cfg.n_embd if cfg.pos_emb == "learned" else 0)
    return 4.0 * n + 2.0 * min(n_trainable, n) + 12.0 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size


def measured_matmul_peak(devices, n: int = 1024, dtype=jnp.float32, repeats: int = 10) -> float:
    """FLOP/s of n x n x n matmuls running at once on all `devices` (a CPU's practical peak;
    a CPU split into several JAX devices is measured as a whole)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(devices), ("d",))
    a = jax.device_put(jnp.ones((len(devices), n, n), dtype), NamedSharding(mesh, P("d")))
    f = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return len(devices) * 2 * n**3 / min(times)


_PEAK: dict = {}


def device_peak(dtype: str = "float32", devices=None) -> tuple[float, str]:
    """(peak FLOP/s of `devices` together, where it came from): a table for accelerators,
    measured once for CPUs."""
    devices = list(devices or jax.devices()[:1])
    dev = devices[0]
    kind = dev.device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return len(devices) * flops, f"table: {len(devices)} x {dev.device_kind} bf16 dense {flops / 1e12:.0f} TFLOP/s"
    # measured on this process's devices and scaled to all of them: in a job of several processes
    # (hosts) each measures its own, and the job's peak is the per-device peak x every device
    local = [d for d in devices if d.process_index == jax.process_index()]
    key = (dtype, len(local), len(devices))
    if key not in _PEAK:
        flops = measured_matmul_peak(local, dtype=jnp.dtype(dtype)) * len(devices) / len(local)
        _PEAK[key] = (flops, f"measured: {dtype} 1024^3 matmuls on {len(local)} {dev.platform} device(s)"
                             + (f", x {len(devices) / len(local):g} for the job's {len(devices)}" if len(local) < len(devices) else "")
                             + f" = {flops / 1e9:.1f} GFLOP/s")
    return _PEAK[key]


def peak_memory_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}  # this process's first device
    return stats.get("peak_bytes_in_use")


def time_steps(step_fn, state, make_batch, key, n_steps: int, warmup: int = 2,
               each=lambda i, state: None) -> tuple[Any, list[float], float]:
    """Runs warmup + n_steps steps, each timed to completion; returns (state, seconds, compile s).
    Step 0 compiles, steps 1 to warmup - 1 warm up, the rest are timed; each(i, state) is called
    before step i and once after the last (i = warmup + n_steps), outside the timed part (the
    profiler: monitor.Profiler.at)."""
    each(0, state)
    t0 = time.perf_counter()
    state, m = step_fn(state, make_batch(0), key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(1, warmup):
        each(i, state)
        state, m = step_fn(state, make_batch(i), key)
    jax.block_until_ready(m)
    times = []
    for i in range(n_steps):
        each(warmup + i, state)
        batch = make_batch(warmup + i)
        jax.block_until_ready(batch)
        t0 = time.perf_counter()
        state, m = step_fn(state, batch, key)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    each(warmup + n_steps, state)
    return state, times, compile_s


def summarize(times: list[float], tokens_per_iter: int, fpt: float, peak: float) -> dict[str, float]:
    sec = statistics.median(times)
    return {"ms_per_iter": 1000 * sec, "tokens_per_s": tokens_per_iter / sec,
            "mfu": fpt * tokens_per_iter / sec / peak}


def sampling_speed(engine, prompt: list[int], n_tokens: int, num_samples: int, repeats: int = 3,
                   **generate_kw) -> dict[str, float]:
    """Decoding speed of engine.generate for this request, compilation excluded.

    steady_tokens_per_s is the difference of a request of n_tokens and one of n_tokens // 10
    (best of `repeats` each), so prefill and per-request start-up cancel, as
    torch_reference.py measures nanoGPT's loop; request_tokens_per_s is the whole long request."""
    short = max(1, n_tokens // 10)

    def best(n: int):
        run = lambda r: engine.generate(prompt, max_new_tokens=n, num_samples=num_samples,  # noqa: E731
                                        key=jax.random.key(r), **generate_kw)
        first = run(0)  # compiles, and the first run of a compiled program is slower
        return min(run(r).seconds for r in range(1, repeats + 1)), first.compile_seconds

    t_short, c_short = best(short)
    t_long, c_long = best(n_tokens)
    return {"steady_tokens_per_s": num_samples * (n_tokens - short) / max(t_long - t_short, 1e-9),
            "request_tokens_per_s": num_samples * n_tokens / t_long, "request_seconds": t_long,
            "compile_s": c_short + c_long, "num_samples": num_samples, "new_tokens": n_tokens,
            "prompt_tokens": len(prompt)}
