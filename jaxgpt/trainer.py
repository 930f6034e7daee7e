"""The training loop alone: steps, evaluation, logging, checkpoints, signals, the loss plot.

`train(cfg)` runs a whole training run as `python train.py` does and returns a summary; what
the loop starts from (data, model, state, mesh, resume) comes ready from jaxgpt.run.
The loop never waits on the device except at log and eval points: metrics of a log step
are read one step later, after the next step has been dispatched.
"""

from __future__ import annotations

import contextlib
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
from jaxgpt.memory import checked_train_step
from jaxgpt.model import num_params
from jaxgpt.optim import lr_schedule
from jaxgpt.run import Run, check_fresh_run, clear_run, run_keys, setup, start_state
from jaxgpt.rundir import RunLock, writing
from jaxgpt.runtime import matmul_precision
from jaxgpt.step import abstract_state, make_eval_step, make_train_step

# with several processes, how often (in steps) they agree on whether a signal asked them to stop
STOP_CHECK = 10

class NonFiniteLoss(UserError):
    """The loss or gradient became NaN or inf (with on_nonfinite=stop)."""


class _finish:
    """Lets checkpoint writes complete and closes the progress bar, also when the loop fails or is
    interrupted (further signals wait meanwhile). After an error, a failure to close is not reported
    over it."""

    def __init__(self, signals: "StopFlag", *closables):
        self.signals, self.closables = signals, closables

    def __enter__(self):
        return self

    def __exit__(self, typ, *exc):
        with self.signals.deferred(honour=False):
            for c in self.closables:
                try:
                    if hasattr(c, "wait"):
                        c.wait()
                    c.close()
                except Exception:  # noqa: BLE001
                    if typ is None:
                        raise


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, checkpoints and stops. A second
    signal stops at once (KeyboardInterrupt), except while a checkpoint is being written
    (`deferred`): then it waits until the write is complete, so a checkpoint is never cut short."""

    def __init__(self):
        self.stop = False
        self.deferring, self.pending = 0, False
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
        if not self.stop:
            self.stop = True
            return
        if self.deferring:  # a second signal during a checkpoint write: after the write
            if not self.pending:
                os.write(2, b"\nsignal received: stopping once the checkpoint being written is complete\n")
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self, honour: bool = True):
        """Signals wait until the block ends; honour: a second signal that came meanwhile then
        stops at once (else it is dropped: the caller is stopping anyway)."""
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        if not self.deferring and self.pending:
            self.pending = False
            if honour:
                raise KeyboardInterrupt

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
    check_fresh_run(cfg)  # before anything is created (setup checks again once init_from=auto is resolved)
    # one training process per out_dir (process 0 of a job); eval_only writes nothing and locks nothing
    with RunLock(cfg.out_dir) if main and not cfg.eval_only else contextlib.nullcontext():
        run = setup(cfg, log)
        if cfg.eval_only:
            return Loop(run, cfg, main, log).eval_only()
        if cfg.overwrite and cfg.init_from != "resume":
            parallel.process_zero_first(clear_run, cfg.out_dir, log)
        config_path = os.path.join(cfg.out_dir, "config.json")
        with writing("config.json", config_path):
            os.makedirs(cfg.out_dir, exist_ok=True)
            if main:
                save_config(cfg, config_path)
        loop = Loop(run, cfg, main, log)
        summary = loop.train()
        if main:
            png = os.path.join(cfg.out_dir, "loss.png")
            with writing("the loss plot", png, "The checkpoints are saved"):
                plot_losses(loop.metrics_path, png)
        return summary


class Loop:
    """One training run's loop and what it carries from step to step: the state, the steps, the
    checkpointers, the best val loss, the timing marks. Each method is one job of the loop."""

    def __init__(self, run: Run, cfg: Config, main: bool, log: Callable[[str], None]):
        self.run, self.cfg, self.main, self.log = run, cfg, main, log
        self.keys = run_keys(cfg.seed)
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        graphdef, abstract, optimizer = abstract_state(run.model_cfg, cfg)
        state_sh = parallel.state_shardings(abstract, run.mesh)
        create = not cfg.eval_only  # an evaluation creates nothing
        self.latest = Checkpointer(cfg.out_dir, "latest", max_to_keep=2, create=create)
        self.best = Checkpointer(cfg.out_dir, "best", create=create)
        self.signals = StopFlag()
        self.state, self.best_val = start_state(run, cfg, abstract, optimizer, state_sh, (self.latest, self.best),
                                                self.keys["init"], log)
        if cfg.init_from != "resume" and create and main and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run starts a fresh log
        self.describe()
        repl = parallel.replicated(run.mesh)
        self.train_step = make_train_step(graphdef, optimizer, cfg, state_sh, parallel.batch_sharding(run.mesh, 3),
                                          repl)
        if cfg.memory_check and create and int(self.state.step) < cfg.max_iters:
            # the step compiled as it will run, after checking that it fits (jaxgpt.memory)
            try:
                self.train_step = checked_train_step(self.train_step, graphdef, optimizer, cfg, self.state, state_sh,
                                                     run.mesh, self.keys["dropout"], checkpoint_copy=True, log=log)
            except BaseException:  # refused (or interrupted while compiling): nothing was written
                self.latest.close()
                self.best.close()
                raise
        self.eval_step = make_eval_step(graphdef, state_sh.params, parallel.batch_sharding(run.mesh, 2), repl,
                                        state_sh.frozen)
        self.schedule = lr_schedule(cfg)
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        self.sync_steps = parallel.needs_step_sync(run.mesh)
        self.start = self.last_saved = int(self.state.step)

    def describe(self) -> None:
        """Logs the model, LoRA and devices; keeps what the MFU needs."""
        run, cfg, state, log = self.run, self.cfg, self.state, self.log
        self.n_trainable = num_params(state.params)
        self.n_params = self.n_trainable + num_params(state.frozen)
        self.peak, peak_src = device_peak("float32" if jax.devices()[0].platform == "cpu" else cfg.dtype,
                                          run.mesh.devices.flat)  # MFU of the whole mesh
        self.fpt = flops_per_token(run.model_cfg, self.n_params, self.n_trainable)
        log(f"model: {cfg.model_type}, {self.n_params / 1e6:.2f}M parameters, compute dtype {run.model_cfg.dtype}, "
            f"attention {run.model_cfg.attn_impl}; "
            f"MFU peak {peak_src}")
        if run.lora_base is not None:
            n, total = self.n_trainable, self.n_params
            quant = run.model_cfg.base_quant
            log(f"{'QLoRA' if quant else 'LoRA'} rank {run.model_cfg.lora_rank} on {run.model_cfg.lora_targets}: "
                f"{n:,} trainable parameters ({100 * n / total:.2f}%), base from {run.lora_base['source']} frozen"
                + (f", its Linear kernels in {quant} (the frozen base: {parallel.tree_bytes(state.frozen) / 1e6:,.1f} "
                   f"MB on the devices)" if quant else ""))
        log(f"devices: {run.mesh.devices.size} ({jax.devices()[0].device_kind}), sharding {cfg.sharding}, "
            f"mesh data={run.mesh.shape['data']} x fsdp={run.mesh.shape['fsdp']}, {jax.process_count()} process(es)")

    def evaluate(self, it: int) -> dict[str, float]:
        ek, n = jax.random.fold_in(self.keys["eval"], it), self.cfg.eval_iters
        out = {}
        for s, split in enumerate(data_lib.SPLITS):
            losses = []
            for i in range(n):
                batch = self.run.eval_batches[split](ek, s * n + i)
                losses.append(self.eval_step(self.state.params, batch, self.state.frozen))
                if self.sync_steps:
                    jax.block_until_ready(losses[-1])
            out[split] = float(np.mean([parallel.host_value(l) for l in losses]))
        return out

    def save(self, ckpt: Checkpointer, it: int) -> None:
        # checkpoints never hold a frozen LoRA base (it is loaded from its source); {} without LoRA
        run, cfg = self.run, self.cfg
        meta = {"step": it, "best_val_loss": self.best_val, "model_config": run.model_cfg.to_dict(),
                "train_config": cfg.to_dict(), "tokenizer": run.tok_meta,
                "rng": {"seed": cfg.seed,
                        "derivation": "fold_in(key(seed), stream); per step fold_in(stream_key, step)"},
                "data_state": {"step": it}, "lora_base": run.lora_base, "origin": run.origin}
        with self.signals.deferred():  # a second signal stops after Orbax has taken the state
            ckpt.save(it, self.state.replace(frozen={}), meta)

    def check_finite(self, first_bad) -> None:
        """on_nonfinite=stop: end the run, saving nothing, once a step was not finite."""
        bad = int(parallel.host_value(first_bad))
        if self.cfg.on_nonfinite == "stop" and bad >= 0:
            raise NonFiniteLoss(f"the loss became non-finite (NaN or inf) at iter {bad}; stopped without saving, "
                                f"so the latest checkpoint (iter {self.last_saved}) is the last good one. Lower "
                                f"--learning_rate, check the data, or pass --on_nonfinite=skip")

    def eval_only(self) -> dict[str, Any]:
        losses = self.evaluate(self.start)
        self.log(f"iter {self.start}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        return {"iter": self.start, "train_loss": losses["train"], "val_loss": losses["val"],
                "best_val_loss": self.best_val}

    def train(self) -> dict[str, Any]:
        cfg, start = self.cfg, self.start
        bar = tqdm(total=cfg.max_iters, initial=start, dynamic_ncols=True, disable=None if self.main else True,
                   file=sys.stderr)
        self.bar, self.say = bar, (bar.write if not bar.disable else self.log)
        self.summary: dict[str, Any] = {"n_params": self.n_params, "n_trainable": self.n_trainable}
        self.log_mark, self.recent_ms = None, None  # (time, iter) of the last log line; ms/iter since then
        self.t_mark, self.steps_since_mark, self.ms_per_iter = time.perf_counter(), 0, float("nan")
        self.it = start
        try:
            with self.signals as stop, _finish(self.signals, self.latest, self.best, bar):
                self._loop(stop, bar)
        except KeyboardInterrupt:  # a second signal: every save begun has completed (_finish waited)
            self.latest.manager.reload()
            newest = self.latest.all_steps()
            raise KeyboardInterrupt(
                f"training stopped at iter {self.it}; "
                + (f"the newest checkpoint is iter {newest[0]} in {self.latest.manager.directory}. Continue with "
                   f"--init_from=resume --out_dir={cfg.out_dir}" if newest else "no checkpoint was written")) from None
        self.summary["iter"] = self.it
        return self.summary

    def _loop(self, stop: StopFlag, bar) -> None:
        cfg, start, it = self.cfg, self.start, self.start
        resumed = cfg.init_from == "resume"
        pending = None  # (iter, metrics on device) of the last log step, read one step later
        while True:
            due = it % cfg.eval_interval == 0 or it == cfg.max_iters
            if due and not (resumed and it == start):  # a resumed step was evaluated before
                self.eval_and_save(it)
            if it >= cfg.max_iters:
                break
            # every process must stop at the same step: with several, they agree every
            # STOP_CHECK steps (a one-bool host collective), since signals arrive at different moments
            if stop.stop if jax.process_count() == 1 else it % STOP_CHECK == 0 and parallel.any_process(stop.stop):
                self.stop_at(it)
                break
            batch = self.run.batches["train"](self.keys["data"], it)
            self.state, metrics = self.train_step(self.state, batch, self.keys["dropout"])
            if self.sync_steps:
                jax.block_until_ready(metrics)
            if pending is not None:
                self.log_step(*pending)
                pending = None
            if it % cfg.log_interval == 0:
                pending = (it, metrics)
            if it == start:  # exclude compilation from the timing
                jax.block_until_ready(self.state)
                self.t_mark, self.steps_since_mark = time.perf_counter(), -1
            it += 1
            self.it = it
            self.steps_since_mark += 1
            bar.update(1)

    def eval_and_save(self, it: int) -> None:
        """Evaluates, saves latest (and best when val improved), appends to metrics.jsonl, logs."""
        jax.block_until_ready(self.state)
        timed = bool(self.steps_since_mark)
        if timed:
            self.ms_per_iter = 1000 * (time.perf_counter() - self.t_mark) / self.steps_since_mark
        self.check_finite(self.state.first_nonfinite)
        losses = self.evaluate(it)
        if losses["val"] < self.best_val:
            self.best_val = losses["val"]
            self.save(self.best, it)
        self.save(self.latest, it)
        self.last_saved = it
        ms, nan = self.ms_per_iter, float("nan")
        row = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
               "lr": float(self.schedule(it)), "ms_per_iter": ms,
               "tokens_per_s": self.tokens_per_iter / ms * 1000 if timed else nan,
               "mfu": self.fpt * self.tokens_per_iter / (ms / 1000) / self.peak if timed else nan,
               "best_val_loss": self.best_val, "skipped_steps": int(parallel.host_value(self.state.skipped))}
        if self.main:
            with writing("metrics", self.metrics_path), open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        self.say(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                 + (f", {ms:.1f} ms/iter, MFU {100 * row['mfu']:.1f}%" if timed else ""))
        self.summary.update(row)
        self.t_mark, self.steps_since_mark = time.perf_counter(), 0

    def stop_at(self, it: int) -> None:
        """A signal asked to stop: checkpoint where the loop is and say how to continue."""
        jax.block_until_ready(self.state)
        self.check_finite(self.state.first_nonfinite)
        with self.signals.deferred(honour=False):  # stopping anyway: a second signal changes nothing
            self.save(self.latest, it)
            self.latest.wait()  # "saved" is said once it is on disk, complete
            self.best.wait()
        self.say(f"stopped at iter {it}; checkpoint saved. Continue with --init_from=resume "
                 f"--out_dir={self.cfg.out_dir}")
        self.summary["stopped_at"] = it

    def log_step(self, p_it: int, p_metrics) -> None:
        """The loss and lr of log step p_it, read one step later (the device is already busy)."""
        self.check_finite(p_metrics["first_nonfinite"])
        loss, lr = float(parallel.host_value(p_metrics["loss"])), float(parallel.host_value(p_metrics["lr"]))
        now = time.perf_counter()
        if self.log_mark is not None and p_it > self.log_mark[1]:
            self.recent_ms = 1000 * (now - self.log_mark[0]) / (p_it - self.log_mark[1])
        self.log_mark = (now, p_it)
        speed = (f"{self.recent_ms:.1f} ms/iter, {self.tokens_per_iter / self.recent_ms * 1000:,.0f} tok/s"
                 if self.recent_ms else "compiling")
        if self.bar.disable:
            self.log(f"iter {p_it}: loss {loss:.4f}, lr {lr:.2e}, {speed}")
        else:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {speed}")
