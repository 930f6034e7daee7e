"""The training loop: data, model, optimizer, evaluation, logging and checkpoints.

`train(cfg)` runs a whole training run as `python train.py` does and returns a summary.
The loop never waits on the device except at log and eval points: metrics of a log step
are read one step later, after the next step has been dispatched.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from jaxgpt import data as data_lib
from jaxgpt import parallel
from jaxgpt.benchmark import device_peak, flops_per_token
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.config import Config, save_config
from jaxgpt.errors import UserError
from jaxgpt.model import num_params
from jaxgpt.optim import lr_schedule
from jaxgpt.run import run_keys, setup, start_state
from jaxgpt.runtime import matmul_precision
from jaxgpt.step import abstract_state, make_eval_step, make_train_step

class NonFiniteLoss(UserError):
    """The loss or gradient became NaN or inf (with on_nonfinite=stop)."""


class _finish:
    """Closes the progress bar and lets checkpoint writes complete, also when the loop fails."""

    def __init__(self, *closables):
        self.closables = closables

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for c in self.closables:
            if hasattr(c, "wait"):
                c.wait()
            c.close()


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, checkpoints and stops."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM"):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame):
        if self.stop:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def plot_losses(metrics_path: str, png_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    it = [r["iter"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(it, [r["train_loss"] for r in rows], label="train")
    ax.plot(it, [r["val_loss"] for r in rows], label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def train(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs a training run (or an evaluation, eval_only) as train.py does; returns a summary."""
    with matmul_precision(cfg.validate().matmul_precision):  # every program of the run is traced inside
        return _train(cfg, log)


def _train(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    main = jax.process_index() == 0  # only process 0 writes logs, metrics and plots
    if not main:
        log = lambda s: None  # noqa: E731
    run = setup(cfg, log)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if main:
        save_config(cfg, os.path.join(cfg.out_dir, "config.json"))
    keys = run_keys(cfg.seed)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")

    graphdef, abstract, optimizer = abstract_state(run.model_cfg, cfg)
    state_sh = parallel.state_shardings(abstract, run.mesh)
    latest, best = Checkpointer(cfg.out_dir, "latest", max_to_keep=2), Checkpointer(cfg.out_dir, "best")
    is_lora = run.lora_base is not None
    # checkpoints never hold a frozen LoRA base (it is loaded from its source); {} without LoRA
    saveable = lambda st: st.replace(frozen={})  # noqa: E731
    state, best_val = start_state(run, cfg, abstract, optimizer, state_sh, latest, keys["init"], log)
    if cfg.init_from != "resume" and main and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log

    n_trainable = num_params(state.params)
    n_params = n_trainable + num_params(state.frozen)
    peak, peak_src = device_peak("float32" if jax.devices()[0].platform == "cpu" else cfg.dtype,
                                 run.mesh.devices.flat)  # MFU of the whole mesh
    fpt = flops_per_token(run.model_cfg, n_params, n_trainable)
    log(f"model: {cfg.model_type}, {n_params / 1e6:.2f}M parameters, compute dtype {run.model_cfg.dtype}, "
        f"attention {run.model_cfg.attn_impl}; "
        f"MFU peak {peak_src}")
    if is_lora:
        log(f"LoRA rank {run.model_cfg.lora_rank} on {run.model_cfg.lora_targets}: {n_trainable:,} trainable "
            f"parameters ({100 * n_trainable / n_params:.2f}%), base from {run.lora_base['source']} frozen")
    log(f"devices: {run.mesh.devices.size} ({jax.devices()[0].device_kind}), sharding {cfg.sharding}, "
        f"mesh data={run.mesh.shape['data']} x fsdp={run.mesh.shape['fsdp']}, {jax.process_count()} process(es)")
    repl = parallel.replicated(run.mesh)
    train_step = make_train_step(graphdef, optimizer, cfg, state_sh, parallel.batch_sharding(run.mesh, 3), repl)
    eval_step = make_eval_step(graphdef, state_sh.params, parallel.batch_sharding(run.mesh, 2), repl, state_sh.frozen)
    schedule = lr_schedule(cfg)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size

    sync_steps = parallel.needs_step_sync(run.mesh)

    def evaluate(params, frozen, it: int) -> dict[str, float]:
        ek = jax.random.fold_in(keys["eval"], it)
        out = {}
        for s, split in enumerate(data_lib.SPLITS):
            losses = []
            for i in range(cfg.eval_iters):
                losses.append(eval_step(params, run.eval_batches[split](ek, s * cfg.eval_iters + i), frozen))
                if sync_steps:
                    jax.block_until_ready(losses[-1])
            out[split] = float(np.mean([parallel.host_value(l) for l in losses]))
        return out

    def checkpoint_meta(it: int) -> dict[str, Any]:
        return {"step": it, "best_val_loss": best_val, "model_config": run.model_cfg.to_dict(),
                "train_config": cfg.to_dict(), "tokenizer": run.tok_meta,
                "rng": {"seed": cfg.seed, "derivation": "fold_in(key(seed), stream); per step fold_in(stream_key, step)"},
                "data_state": {"step": it}, "lora_base": run.lora_base, "origin": run.origin}

    start = last_saved = int(state.step)

    def check_finite(first_bad) -> None:
        """on_nonfinite=stop: end the run, saving nothing, once a step was not finite."""
        bad = int(parallel.host_value(first_bad))
        if cfg.on_nonfinite == "stop" and bad >= 0:
            raise NonFiniteLoss(f"the loss became non-finite (NaN or inf) at iter {bad}; stopped without saving, "
                                f"so the latest checkpoint (iter {last_saved}) is the last good one. Lower "
                                f"--learning_rate, check the data, or pass --on_nonfinite=skip")

    if cfg.eval_only:
        losses = evaluate(state.params, state.frozen, start)
        log(f"iter {start}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        return {"iter": start, "train_loss": losses["train"], "val_loss": losses["val"], "best_val_loss": best_val}

    bar = tqdm(total=cfg.max_iters, initial=start, dynamic_ncols=True, disable=None if main else True,
               file=sys.stderr)
    say = bar.write if not bar.disable else log
    summary: dict[str, Any] = {"n_params": n_params, "n_trainable": n_trainable}
    pending = None  # (iter, metrics on device) of the last log step, read one step later
    log_mark, recent_ms = None, None  # (time, iter) of the last log line; ms/iter since then
    t_mark, steps_since_mark, ms_per_iter = time.perf_counter(), 0, float("nan")
    it, resumed = start, cfg.init_from == "resume"
    with StopFlag() as stop, _finish(latest, best, bar):
        while True:
            due = it % cfg.eval_interval == 0 or it == cfg.max_iters
            if due and not (resumed and it == start):  # a resumed step was evaluated before
                jax.block_until_ready(state)
                if steps_since_mark:
                    ms_per_iter = 1000 * (time.perf_counter() - t_mark) / steps_since_mark
                check_finite(state.first_nonfinite)
                losses = evaluate(state.params, state.frozen, it)
                if losses["val"] < best_val:
                    best_val = losses["val"]
                    best.save(it, saveable(state), checkpoint_meta(it))
                latest.save(it, saveable(state), checkpoint_meta(it))
                last_saved = it
                row = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                       "lr": float(schedule(it)), "ms_per_iter": ms_per_iter,
                       "tokens_per_s": tokens_per_iter / ms_per_iter * 1000 if steps_since_mark else float("nan"),
                       "mfu": fpt * tokens_per_iter / (ms_per_iter / 1000) / peak if steps_since_mark else float("nan"),
                       "best_val_loss": best_val, "skipped_steps": int(parallel.host_value(state.skipped))}
                if main:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
                say(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                    + (f", {ms_per_iter:.1f} ms/iter, MFU {100 * row['mfu']:.1f}%" if steps_since_mark else ""))
                summary.update(row)
                t_mark, steps_since_mark = time.perf_counter(), 0
            if it >= cfg.max_iters:
                break
            if stop.stop:
                jax.block_until_ready(state)
                check_finite(state.first_nonfinite)
                latest.save(it, saveable(state), checkpoint_meta(it))
                say(f"stopped at iter {it}; checkpoint saved. Continue with --init_from=resume "
                    f"--out_dir={cfg.out_dir}")
                summary["stopped_at"] = it
                break

            batch = run.batches["train"](keys["data"], it)
            state, metrics = train_step(state, batch, keys["dropout"])
            if sync_steps:
                jax.block_until_ready(metrics)
            if pending is not None:
                p_it, p_metrics = pending
                check_finite(p_metrics["first_nonfinite"])
                loss, lr = float(parallel.host_value(p_metrics["loss"])), float(parallel.host_value(p_metrics["lr"]))
                now = time.perf_counter()
                if log_mark is not None and p_it > log_mark[1]:
                    recent_ms = 1000 * (now - log_mark[0]) / (p_it - log_mark[1])
                log_mark = (now, p_it)
                speed = (f"{recent_ms:.1f} ms/iter, {tokens_per_iter / recent_ms * 1000:,.0f} tok/s"
                         if recent_ms else "compiling")
                if bar.disable:
                    log(f"iter {p_it}: loss {loss:.4f}, lr {lr:.2e}, {speed}")
                else:
                    bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {speed}")
                pending = None
            if it % cfg.log_interval == 0:
                pending = (it, metrics)
            if it == start:  # exclude compilation from the timing
                jax.block_until_ready(state)
                t_mark, steps_since_mark = time.perf_counter(), -1
            it += 1
            steps_since_mark += 1
            bar.update(1)
    if main:
        plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
    summary["iter"] = it
    return summary
