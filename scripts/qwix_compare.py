"""qwix (Google's JAX quantization library) against jaxgpt/quant.py, for the README's choice.

qwix is not a jaxgpt dependency; this runs in a throwaway environment:

    python3 -m venv /tmp/qwixenv && /tmp/qwixenv/bin/pip install qwix==0.1.8 jax==0.10.2 flax==0.12.8
    /tmp/qwixenv/bin/python scripts/qwix_compare.py kernel
    /tmp/qwixenv/bin/python scripts/qwix_compare.py block qwix     # or: block ours
    /tmp/qwixenv/bin/python scripts/qwix_compare.py lora qwix      # or: lora ours

kernel: one 1024 x 4096 normal kernel: bytes the quantized arrays occupy on the device,
        jitted quantize time, relative RMS error after dequantizing.
block:  one GPT-2-medium block's four kernels, drawn and quantized one by one: bytes, and the
        peak RSS above the start of a second pass (the first compiles).
lora:   a 4-block GPT-2-medium-shaped jaxgpt GPT, built in float32, then given an nf4 base:
        qwix.apply_lora_to_model (rank 8, tile 64, as the issue tried) or quant.quantize_tree;
        seconds, peak RSS above the built model, and the resulting state.
qwix's nf4 is set up as its LoraProvider(tile_size=64) sets up a weight: blocks of 64 along the
contracting axis C_in, a scale per column; the same grouping as quant.py.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import qwix  # noqa: E402

from jaxgpt import quant  # noqa: E402

C = 1024
SHAPES = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]  # c_attn, attn.c_proj, c_fc, mlp.c_proj
IMPLS = {  # name -> (quantize(w, kind), dequantize(q))
    "qwix": (lambda w, kind: qwix.quantize(w, kind, channelwise_axes=(1,), tiled_axes={0: 64}), qwix.dequantize),
    "ours": (quant.quantize, quant.dequantize),
}


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> int:
    """Resets VmHWM to the current RSS and returns that RSS (kB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kb("VmRSS")


def device_bytes(tree) -> int:
    return sum(x.on_device_size_in_bytes() for x in jax.tree.leaves(tree))


def kernel():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((1024, 4096), dtype=np.float32))
    for name, kinds in (("qwix", ("nf4", "int4", "int8")), ("ours", ("nf4", "int8"))):
        quantize, dequantize = IMPLS[name]
        for kind in kinds:
            f = jax.jit(lambda w: quantize(w, jnp.int8 if kind == "int8" and name == "qwix" else kind))
            jax.block_until_ready(f(w))
            t0 = time.perf_counter()
            q = jax.block_until_ready(f(w))
            ms = (time.perf_counter() - t0) * 1e3
            d = np.asarray(dequantize(q), np.float32)
            err = np.linalg.norm(d - np.asarray(w)) / np.linalg.norm(np.asarray(w))
            print(f"{name} {kind}: {device_bytes(q) / 1e6:.2f} MB ({8 * device_bytes(q) / w.size:.2f} bits/param), "
                  f"arrays {[(x.dtype.name, x.shape) for x in jax.tree.leaves(q)]}, quantize {ms:.0f} ms, "
                  f"relative RMS error {err:.4f}")


def block(name: str):
    quantize = jax.jit(lambda w: IMPLS[name][0](w, "nf4"))
    rng = np.random.default_rng(0)

    def one_block():
        out = []
        for shape in SHAPES:
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= 0.02
            out.append(jax.block_until_ready(quantize(jax.device_put(w))))
            del w
        return out

    one_block()  # compiles
    base = reset_peak()
    out = one_block()
    print(f"{name}: one GPT-2-medium block's kernels (12.6M params) in nf4: {device_bytes(out) / 2**20:.1f} MiB "
          f"(float32 {4 * 12 * C * C / 2**20:.1f} MiB); peak RSS +{(status_kb('VmHWM') - base) / 1e3:.0f} MB")


def lora(name: str):
    from flax import nnx

    from jaxgpt.model import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=50257, block_size=1024, n_layer=4, n_head=16, n_embd=C, bias=True)
    model = build_model(cfg)
    base = reset_peak()
    t0 = time.perf_counter()
    if name == "qwix":
        provider = qwix.LoraProvider(module_path=r".*(c_attn|c_proj|c_fc)", rank=8, alpha=16.0,
                                     weight_qtype="nf4", tile_size=64)
        state = nnx.state(qwix.apply_lora_to_model(model, provider, jnp.zeros((1, 8), jnp.int32), rngs=nnx.Rngs(0)))
    else:
        state = quant.quantize_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)), lambda path, x: path[-1] == "kernel")
    secs = time.perf_counter() - t0
    leaves = jax.tree.leaves(state)
    print(f"{name}: nf4 base for a 4-block GPT-2-medium-shaped GPT ({4 * (4 * 12 * C * C + 51281 * C) / 1e6:.0f} MB "
          f"in float32): {secs:.1f} s, peak RSS +{(status_kb('VmHWM') - base) / 1e3:.0f} MB; state "
          f"{device_bytes(leaves) / 1e6:.0f} MB in {len(leaves)} arrays of {sorted({x.dtype.name for x in leaves})}")


if __name__ == "__main__":
    print(f"qwix {qwix.__version__}, jax {jax.__version__}, {jax.devices()[0].platform}")
    {"kernel": kernel, "block": block, "lora": lora}[sys.argv[1]](*sys.argv[2:])
