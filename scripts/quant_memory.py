"""Measures jaxgpt/quant.py for the README's QLoRA memory table.

    python scripts/quant_memory.py

1. The frozen base of each GPT-2 size: bytes of the blocks' Linear kernels in float32, int8 and
   nf4, computed from the shapes, then checked by quantizing random kernels of the 124M and
   medium shapes; the embeddings in float32 or bfloat16; LayerNorms and biases in float32.
2. Peak resident memory (VmHWM) while quantize_stream quantizes a GPT-2-medium-shaped set of
   kernels handed over one at a time, against the float32 model it never holds. On the CPU,
   host and device are one memory: a loaded kernel and its device copy are both counted. glibc
   keeps some freed memory mapped; MALLOC_MMAP_THRESHOLD_=1048576 shows the peak without that.
3. Relative RMS error and quantize time of nf4 and int8 on a 1024 x 4096 normal kernel.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt.quant import dequantize, quantize, quantize_stream  # noqa: E402

SIZES = {"gpt2 (124M)": (12, 768), "gpt2-medium (355M)": (24, 1024),
         "gpt2-large (774M)": (36, 1280), "gpt2-xl (1.5B)": (48, 1600)}
VOCAB, CONTEXT = 50257, 1024
MB = 1e6


def block_kernels(C: int) -> list[tuple[str, tuple[int, int]]]:
    """One transformer block's Linear kernels, (C_in, C_out)."""
    return [("attn.c_attn", (C, 3 * C)), ("attn.c_proj", (C, C)),
            ("mlp.c_fc", (C, 4 * C)), ("mlp.c_proj", (4 * C, C))]


def kernel_bytes(shape, kind: str) -> int:
    c_in, c_out = shape
    if kind == "float32":
        return 4 * c_in * c_out
    if kind == "int8":
        return c_in * c_out + 4 * c_out  # a float32 scale per column
    return c_in * c_out // 2 + 4 * (c_in // 64) * c_out  # nf4: half a byte, a float32 scale per 64


def table():
    print("frozen base, bytes (MB = 1e6): Linear kernels of the blocks | wte + wpe | LayerNorms + biases")
    print(f"{'model':20s} {'kernels f32':>11s} {'int8':>8s} {'nf4':>8s} {'emb f32':>8s} {'emb bf16':>8s}"
          f" {'ln+bias':>8s} {'total f32':>9s} {'nf4+emb f32':>11s} {'nf4+emb bf16':>12s}")
    for name, (L, C) in SIZES.items():
        k = {kind: L * sum(kernel_bytes(s, kind) for _, s in block_kernels(C)) for kind in ("float32", "int8", "nf4")}
        emb = (VOCAB + CONTEXT) * C
        small = 4 * (L * (4 * C + 9 * C) + 2 * C)  # per block ln_1, ln_2 (scale, bias) and 4 biases; ln_f
        print(f"{name:20s} {k['float32'] / MB:11.1f} {k['int8'] / MB:8.1f} {k['nf4'] / MB:8.1f} {4 * emb / MB:8.1f}"
              f" {2 * emb / MB:8.1f} {small / MB:8.2f} {(k['float32'] + 4 * emb + small) / MB:9.1f}"
              f" {(k['nf4'] + 4 * emb + small) / MB:11.1f} {(k['nf4'] + 2 * emb + small) / MB:12.1f}")


def verify(name: str):
    """Quantizes random kernels of a model's shapes and sums the bytes the arrays occupy."""
    L, C = SIZES[name]
    rng = np.random.default_rng(0)
    for kind in ("int8", "nf4"):
        got = 0
        for _ in range(L):
            for _, shape in block_kernels(C):
                q = quantize(rng.standard_normal(shape, dtype=np.float32) * 0.02, kind)
                got += q.codes.on_device_size_in_bytes() + q.scale.on_device_size_in_bytes()
        want = L * sum(kernel_bytes(s, kind) for _, s in block_kernels(C))
        verdict = "equal" if got == want else "DIFFERENT"
        print(f"  {name} {kind}: quantized arrays hold {got} bytes, computed {want}: {verdict}")


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss():
    L, C = SIZES["gpt2-medium (355M)"]
    rng = np.random.default_rng(0)
    shapes = block_kernels(C)
    for _, shape in shapes:  # compile the quantizer for each shape before measuring
        quantize(np.zeros(shape, np.float32))

    def loader():  # reads (here: draws) one float32 kernel at a time, as a file reader would
        for i in range(L):
            for name, shape in shapes:
                w = rng.standard_normal(shape, dtype=np.float32)
                w *= 0.02  # in place: one float array per kernel
                yield ("h", str(i), *name.split("."), "kernel"), w
                del w

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = status_kb("VmRSS")
    t0 = time.perf_counter()
    tree = quantize_stream(loader(), lambda path, x: True)
    seconds = time.perf_counter() - t0
    peak, end = status_kb("VmHWM") - base, status_kb("VmRSS") - base
    qbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    f32 = L * sum(4 * a * b for _, (a, b) in shapes)
    largest = max(4 * a * b for _, (a, b) in shapes)
    print(f"quantize_stream, GPT-2-medium kernels ({L} x 4, nf4), {seconds:.1f} s: peak RSS +{peak / 1e3:.1f} MB "
          f"(at the end +{end / 1e3:.1f} MB) over a {base / 1e3:.0f} MB start; the nf4 tree is {qbytes / MB:.1f} MB, "
          f"so the peak is the tree + {peak / 1e3 - qbytes / MB:.1f} MB; the largest float32 kernel is "
          f"{largest / MB:.1f} MB, all of them {f32 / MB:.1f} MB")


def errors():
    w = np.random.default_rng(1).standard_normal((1024, 4096), dtype=np.float32)
    for kind in ("nf4", "int8"):
        jax.block_until_ready(quantize(w, kind))  # compile
        t0 = time.perf_counter()
        q = jax.block_until_ready(quantize(w, kind))
        ms = (time.perf_counter() - t0) * 1e3
        d = np.asarray(dequantize(q))
        print(f"{kind}: relative RMS error {np.linalg.norm(d - w) / np.linalg.norm(w):.4f}, "
              f"{q.bits_per_param:.3f} bits/param, {q.nbytes / MB:.2f} MB for 1024 x 4096 "
              f"(float32 {w.nbytes / MB:.2f} MB), "
              f"quantize {ms:.0f} ms")


if __name__ == "__main__":
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    peak_rss()  # first, while the process holds nothing else
    table()
    verify("gpt2 (124M)")
    verify("gpt2-medium (355M)")
    errors()
