"""Time to target: trains recipes until their val loss first reaches a target, side by side.

    python scripts/time_to_target.py --target=1.88 --repeat=2 \\
        --recipe classic="--config configs/shakespeare_char_cpu.py" \\
        --recipe modern="--config configs/shakespeare_char_modern_cpu.py" \\
        --common="--input_file=../shared/data/tinyshakespeare.txt" --torch

Each recipe run is a fresh process (the same start for every run); runs are interleaved
(classic, modern, classic, modern, ...) so both see the same machine load. Rules, the same for
every recipe:
- val loss: the mean over a FIXED eval set, `--eval_batches` batches of `--eval_batch_size` x
  `--eval_block` tokens of the val split at positions drawn once from seed 0 (default 200 x 12 x
  64 = 153,600 tokens): every recipe and every eval sees the same tokens, so a longer training
  context buys nothing at eval time.
- it is checked every `--eval_every` steps; a quick estimate on the first `--quick_batches` batches
  comes first, and the full eval runs only when that estimate is within `--margin` of the target
  (far from the target, the full eval cannot reach it).
- seconds: wall clock of the training steps only, from the end of the first step (its compilation
  and execution are reported apart, as `first step s`) to the end of the step whose eval first
  reaches the target; evaluation time is not counted.
- steps and tokens: steps taken (first included) and steps x batch_size x block_size x accumulation.
`--torch` runs ../shared/bench/torch_reference.py with the classic CPU recipe's model and
schedule for the classic run's steps-to-target (it cannot stop at a target): its median ms/iter
x those steps is an ESTIMATE of its time to target, labelled so, with its own final val loss
(over --eval_batches random batches).
A run that does not reach the target by its config's max_iters (or --max_seconds of training)
prints "not reached" with the best val loss seen.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REF = os.path.join(ROOT, "..", "shared", "bench", "torch_reference.py")


def one_run(args, recipe_argv: list[str]) -> dict:
    """Trains one recipe in this process until the target (or its max_iters); returns the row."""
    sys.path.insert(0, ROOT)
    from jaxgpt.config import parse_args
    from jaxgpt.parallel import set_cpu_devices

    cfg = parse_args(recipe_argv).validate()
    set_cpu_devices(cfg.cpu_devices)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxgpt import data as data_lib
    from jaxgpt import parallel, prepare
    from jaxgpt.start import setup
    from jaxgpt.runtime import matmul_precision
    from jaxgpt.trainer import build

    quiet = lambda s: None  # noqa: E731
    cfg = cfg.replace(out_dir=tempfile.mkdtemp(prefix="ttt-"), eval_interval=10**9)
    with matmul_precision(cfg.matmul_precision):
        run = setup(cfg, quiet)
        loop = build(run, quiet)
        meta = prepare.ensure_prepared(cfg.resolved_data_dir(), cfg.dataset, cfg.input_file, tokenizer=cfg.tokenizer)
        val = np.asarray(data_lib.load_split(cfg.resolved_data_dir(), "val", meta), np.int32)
        rng = np.random.RandomState(0)  # the fixed eval set: the same positions for every recipe
        T, B = args.eval_block, args.eval_batch_size
        starts = rng.randint(0, len(val) - T - 1, size=(args.eval_batches, B))
        windows = val[starts[..., None] + np.arange(T + 1)]  # (N, B, T + 1)
        sh = parallel.batch_sharding(run.mesh, 2)
        evals = [(jax.device_put(jnp.asarray(w[:, :-1]), sh), jax.device_put(jnp.asarray(w[:, 1:]), sh))
                 for w in windows]

        def val_loss(n):
            losses = []
            for b in evals[:n]:
                losses.append(loop.eval_step(loop.state.params, b, loop.state.frozen))
                if loop.sync_steps:  # CPU devices in one process: one collective program at a time
                    jax.block_until_ready(losses[-1])
            return float(np.mean([parallel.host_value(x) for x in losses]))

        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        state, step_fn, batches, key = loop.state, loop.train_step, run.batches["train"], loop.keys["dropout"]
        t0 = time.perf_counter()
        state, _ = step_fn(state, batches(loop.keys["data"], 0), key)
        jax.block_until_ready(state)
        first_s = time.perf_counter() - t0
        it, train_s, best, reached, history = 1, 0.0, float("inf"), False, []
        while it < cfg.max_iters and train_s < args.max_seconds:
            t0 = time.perf_counter()
            stop = min(cfg.max_iters, (it // args.eval_every + 1) * args.eval_every)
            for i in range(it, stop):
                state, _ = step_fn(state, batches(loop.keys["data"], i), key)
                if loop.sync_steps:
                    jax.block_until_ready(state)
            jax.block_until_ready(state)
            train_s += time.perf_counter() - t0
            it = stop
            loop.state = state
            quick = val_loss(args.quick_batches)
            full = val_loss(args.eval_batches) if quick <= args.target + args.margin else float("nan")
            history.append((it, round(quick, 4), None if np.isnan(full) else round(full, 4)))
            print(f"  step {it}: {train_s:.1f} s, val ~{quick:.4f} (quick), {full:.4f} (full)", file=sys.stderr,
                  flush=True)
            best = min(best, full) if not np.isnan(full) else best
            if full <= args.target:
                reached = True
                break
    return {"reached": reached, "steps": it, "tokens": it * tokens_per_step, "train_s": round(train_s, 2),
            "first_step_s": round(first_s, 2), "ms_per_iter": round(1000 * train_s / max(1, it - 1), 2),
            "val": round(best, 4) if best < float("inf") else None, "history": history}


def run_child(args, name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", shlex.join(argv), *child_flags(args)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"{name}: {shlex.join(argv)}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=os.getcwd())  # progress on stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"{name} failed (rc {out.returncode}); its error is above")
    return json.loads(lines[-1])


def child_flags(args) -> list[str]:
    return [f"--{k}={getattr(args, k)}" for k in ("target", "eval_every", "eval_batches", "quick_batches",
                                                 "eval_batch_size", "eval_block", "margin", "max_seconds")]


def torch_baseline(args, steps: int, common: list[str]) -> dict:
    """The PyTorch reference with the classic CPU recipe (4 x 4 x 128, block 64, batch 12, lr 1e-3
    -> 1e-4, warmup 100) for `steps` steps; its schedule spans `steps` (2000 for the classic run)."""
    text = next((a.split("=", 1)[1] for a in common if a.startswith("--input_file=")), None)
    cmd = [sys.executable, TORCH_REF, "--text", text, "--batch", "12", "--block", "64", "--layers", "4",
           "--heads", "4", "--d", "128", "--iters", str(steps), "--lr", "1e-3", "--min-lr", "1e-4",
           "--warmup", "100", "--eval-every", "0", "--eval-iters", str(args.eval_batches)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    res = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    return {"steps": steps, "ms_per_iter": res["ms_per_iter"], "est_s": round(res["ms_per_iter"] * steps / 1000, 1),
            "val": res.get("val_loss"), "cmd": shlex.join(cmd)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", default=[], help="NAME='train.py flags' (repeatable)")
    ap.add_argument("--common", default="", help="flags added to every recipe, e.g. --input_file=...")
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds of all recipes")
    ap.add_argument("--eval_every", type=int, default=50)
    ap.add_argument("--eval_batches", type=int, default=200)
    ap.add_argument("--quick_batches", type=int, default=20)
    ap.add_argument("--margin", type=float, default=0.06)
    ap.add_argument("--eval_batch_size", type=int, default=12)
    ap.add_argument("--eval_block", type=int, default=64)
    ap.add_argument("--max_seconds", type=float, default=1e9, help="stop a run after this much training time")
    ap.add_argument("--torch", action="store_true", help="also estimate the PyTorch reference (classic recipe)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_run(args, shlex.split(args.one))), flush=True)
        return 0
    if not args.recipe:
        ap.error("pass at least one --recipe NAME='flags'")
    common = shlex.split(args.common)
    recipes = [(r.split("=", 1)[0], shlex.split(r.split("=", 1)[1]) + common) for r in args.recipe]
    print(f"target val {args.target} over {args.eval_batches} x {args.eval_batch_size} x {args.eval_block} fixed "
          f"val tokens, checked every {args.eval_every} steps; seconds = training steps only (first step and "
          f"evals apart)")
    rows = []
    for rnd in range(args.repeat):
        for name, rargv in recipes:
            r = run_child(args, name, rargv)
            rows.append((name, rnd, r))
            print(f"{name} run {rnd + 1}: " + json.dumps(r), flush=True)
    print("\n| recipe | run | reached | steps | tokens | seconds | ms/iter | first step s | val |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rnd, r in rows:
        print(f"| {name} | {rnd + 1} | {'yes' if r['reached'] else 'not reached'} | {r['steps']} | {r['tokens']:,} | "
              f"{r['train_s']:.1f} | {r['ms_per_iter']:.1f} | {r['first_step_s']:.1f} | {r['val']} |")
    if args.torch:
        classic = [r for n, _, r in rows if n == recipes[0][0] and r["reached"]]
        steps = classic[0]["steps"] if classic else 2000
        t = torch_baseline(args, steps, common)
        print(f"| PyTorch reference ({recipes[0][0]} recipe), ESTIMATE = {t['ms_per_iter']} ms/iter x {steps} steps | "
              f"1 | val {t['val']} after {steps} steps | {steps} | {steps * 12 * 64:,} | ~{t['est_s']} | "
              f"{t['ms_per_iter']} | - | {t['val']} |")
        print(f"torch command: {t['cmd']}")
    print("\ncommands:")
    for name, rargv in recipes:
        print(f"  {name}: PYTHONPATH=. python scripts/time_to_target.py --one={shlex.quote(shlex.join(rargv))} "
              + " ".join(child_flags(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
