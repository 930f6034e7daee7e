"""The README's QLoRA memory table: bytes of the base, the adapters and the optimizer state, and the
peak memory of one training step, for full finetuning, LoRA and QLoRA on GPT-2-shaped models.

    python scripts/qlora_memory.py --sizes=gpt2,gpt2-medium --methods=full,lora,qlora --B=1 --T=128

Each size gets a random-weight Hugging Face directory (scripts/random_gpt2.py) under --dir; each
(size, method) runs in a fresh process that goes through the real path (jaxgpt.start.setup loads,
and for QLoRA quantizes as it streams, the base; trainer.build makes the state and compiles the
step) and then takes one training step; it reports its bytes and its peak RSS (getrusage's
ru_maxrss: the whole process, the JAX runtime and XLA's compilation included). On a GPU the
device's peak is reported too (memory_stats' peak_bytes_in_use). Rows print as JSON lines and a
Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def child(size_dir: str, method: str, B: int, T: int, work: str) -> dict:
    import jax

    from jaxgpt import parallel
    from jaxgpt.config import parse_args
    from jaxgpt.start import setup
    from jaxgpt.trainer import build

    flags = [f"--init_from={size_dir}", "--tokenizer=gpt2", f"--finetune_method={method}", f"--batch_size={B}",
             f"--block_size={T}", "--dtype=float32", "--lora_rank=8", "--lora_alpha=16", "--learning_rate=1e-4",
             f"--input_file={os.path.join(ROOT, 'jaxgpt')}", "--include=**/*.py", f"--data_dir={work}/data",
             f"--out_dir={work}/out-{method}", "--max_iters=1"]
    cfg = parse_args(flags).validate()
    t0 = time.perf_counter()
    run = setup(cfg, log=lambda s: None)
    loop = build(run, log=lambda s: None)
    t_load = time.perf_counter() - t0
    state = loop.state
    sizes = {"base_bytes": parallel.tree_bytes(state.frozen if cfg.adapters else state.params),
             "adapter_bytes": parallel.tree_bytes(state.params) if cfg.adapters else 0,
             "opt_bytes": parallel.tree_bytes(state.opt_state), "n_params": loop.n_params, "n_trainable": loop.n_trainable}
    t1 = time.perf_counter()
    batch = run.batches["train"](loop.keys["data"], 0)
    state, metrics = loop.train_step(state, batch, loop.keys["dropout"])
    jax.block_until_ready(state)
    out = {**sizes, "loss": float(metrics["loss"]), "load_s": round(t_load, 1),
           "first_step_s": round(time.perf_counter() - t1, 1),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    dev = jax.devices()[0]
    if dev.platform != "cpu" and dev.memory_stats():
        out["device_peak_bytes"] = dev.memory_stats().get("peak_bytes_in_use")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="gpt2,gpt2-medium,gpt2-large")
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--dir", default="qlora-memory", help="where the random models, data and runs go")
    ap.add_argument("--child", nargs=2, metavar=("SIZE_DIR", "METHOD"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a.child[0], a.child[1], a.B, a.T, a.dir)))
        return 0
    from random_gpt2 import write_random_gpt2

    rows = []
    for size in a.sizes.split(","):
        size_dir = os.path.join(a.dir, f"{size}-random")
        if not os.path.isfile(os.path.join(size_dir, "model.safetensors")):
            write_random_gpt2(size, size_dir)
        for method in a.methods.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), f"--B={a.B}", f"--T={a.T}", f"--dir={a.dir}",
                   "--child", size_dir, method]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode} (a negative one: that signal; "
                                                     f"-9, SIGKILL, is the kernel's out-of-memory killer)"])[-1]
            row = {"size": size, "method": method, **(json.loads(line[0][7:]) if line else {"error": why})}
            print(json.dumps(row), flush=True)
            rows.append(row)
    mb = lambda k, r: f"{r[k] / 1e6:,.1f}" if k in r else "-"  # noqa: E731
    print(f"\n| shape | method | base MB | adapters MB | optimizer state MB | peak RSS of one step (B={a.B}, T={a.T}) MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size']} | {r['method']} | {mb('base_bytes', r)} | {mb('adapter_bytes', r)} | {mb('opt_bytes', r)} | "
              f"{mb('peak_rss_bytes', r) if 'error' not in r else r['error']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
