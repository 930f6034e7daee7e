"""The training loop: `train(cfg)` runs a whole run as `python train.py` does and returns a summary.

What the loop starts from (data, model, state, mesh, resume) comes ready from jaxgpt.start; `build`
turns that into the parts the loop uses (the state, the compiled steps, the checkpointers); the loop
in `train` reads top to bottom, its periodic work (evaluate, checkpoint, log, profile) in its body.
It never waits on the device except at log and eval points: a log step's metrics are read one step
later, after the next step has been dispatched. What it logs goes to a jaxgpt.monitor.Monitor
(metrics.jsonl, TensorBoard, wandb, loss.png, the profiler); the rows are built here.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from jaxgpt import data as data_lib
from jaxgpt import parallel
from jaxgpt.benchmark import device_peak, flops_per_token
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.config import Config, format_config, save_config
from jaxgpt.errors import UserError
from jaxgpt.memory import checked_train_step
from jaxgpt.model import num_params
from jaxgpt.monitor import Monitor
from jaxgpt.optim import lr_schedules
from jaxgpt.rundir import RunLock, writing
from jaxgpt.runtime import matmul_precision
from jaxgpt.signals import StopFlag, finishing
from jaxgpt.start import Run, check_fresh_run, clear_run, resolve, run_keys, setup, start_state
from jaxgpt.step import abstract_state, make_eval_step, make_train_step

# with several processes, how often (in steps) they agree on whether a signal asked them to stop
STOP_CHECK = 10


class NonFiniteLoss(UserError):
    """The loss or gradient became NaN or inf (with on_nonfinite=stop)."""


def train(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs a training run (or an evaluation, eval_only) as train.py does; returns a summary."""
    main = jax.process_index() == 0  # only process 0 writes logs, metrics and plots
    if not main:
        log = lambda s: None  # noqa: E731
    cfg = resolve(cfg, log)  # the one validated, resolved config: what is printed and saved is what runs
    log("config:\n" + format_config(cfg))
    check_fresh_run(cfg)  # before anything is created
    with matmul_precision(cfg.matmul_precision), \
            RunLock(cfg.out_dir) if main and not cfg.eval_only else contextlib.nullcontext():
        run = setup(cfg, log)
        t = build(run, log)
        if cfg.eval_only:
            losses = evaluate(t, run, t.start)
            log(f"iter {t.start}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            return {"iter": t.start, "train_loss": losses["train"], "val_loss": losses["val"],
                    "best_val_loss": t.best_val}
        if cfg.overwrite and cfg.init_from != "resume":
            parallel.process_zero_first(clear_run, cfg.out_dir, log)
        config_path = os.path.join(cfg.out_dir, "config.json")
        with writing("config.json", config_path):
            os.makedirs(cfg.out_dir, exist_ok=True)
            if main:
                save_config(cfg, config_path)
        # metrics.jsonl (a fresh run's emptied, a resumed run's cut to its checkpoint), TensorBoard,
        # wandb, loss.png and --profile; all on process 0 only
        with Monitor(cfg, t.start, main, log) as mon:
            return loop(t, run, main, log, mon)


def loop(t: "Training", run: Run, main: bool, log, mon: Monitor) -> dict[str, Any]:
    """The loop: profile, evaluate and checkpoint when due, stop when asked, step, log."""
    cfg, start = run.cfg, t.start
    bar = tqdm(total=cfg.max_iters, initial=start, dynamic_ncols=True, disable=None if main else True,
               file=sys.stderr)
    say = bar.write if not bar.disable else log
    summary: dict[str, Any] = {"n_params": t.n_params, "n_trainable": t.n_trainable}
    clock = Clock()
    pending = None  # (iter, metrics on device) of the last log step, read one step later
    it = start
    signals = StopFlag()
    try:
        with signals as stop, finishing(signals, t.latest, t.best, bar):
            while True:
                if mon.profile(it, t.state):  # --profile=START:STOP: the trace started (at START) or stopped (STOP)
                    clock.mark(it - 1)  # starting and stopping it is not training time
                if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and not (cfg.init_from == "resume" and it == start):
                    jax.block_until_ready(t.state)  # a resumed run's first step was evaluated before it stopped
                    if pending is not None:  # the last log step's row first (its step is done)
                        log_step(t, cfg, bar, log, clock, mon, *pending)
                        pending = None
                    ms = clock.ms_per_iter()
                    check_finite(t, cfg)
                    losses = evaluate(t, run, it)
                    if losses["val"] < t.best_val:
                        t.best_val = losses["val"]
                        save(t, run, t.best, it, signals)
                    save(t, run, t.latest, it, signals)
                    t.last_saved = it
                    row = eval_row(t, run, it, losses, ms)
                    mon.eval(row)  # a metrics.jsonl row (TensorBoard, wandb) and loss.png redrawn
                    say(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                        + (f", {ms:.1f} ms/iter, MFU {100 * row['mfu']:.1f}%" if ms == ms else ""))
                    summary.update({k: v for k, v in row.items() if k != "kind"})
                    clock.mark(it - 1)  # training time starts again: steps to it - 1 are done
                if it >= cfg.max_iters:
                    break
                # every process must stop at the same step: with several, they agree every STOP_CHECK
                # steps (a one-bool host collective), since signals arrive at different moments
                if stop.stop if jax.process_count() == 1 else it % STOP_CHECK == 0 and parallel.any_process(stop.stop):
                    jax.block_until_ready(t.state)
                    if pending is not None:
                        log_step(t, cfg, bar, log, clock, mon, *pending)
                    check_finite(t, cfg)
                    with signals.deferred(honour=False):  # stopping anyway: a second signal changes nothing
                        save(t, run, t.latest, it, signals)
                        t.latest.wait()  # "saved" is said once it is on disk, complete
                        t.best.wait()
                    say(f"stopped at iter {it}; checkpoint saved. Continue with --init_from=resume "
                        f"--out_dir={cfg.out_dir}")
                    summary["stopped_at"] = it
                    break
                batch = run.batches["train"](t.keys["data"], it)
                t.state, metrics = t.train_step(t.state, batch, t.keys["dropout"])
                if t.sync_steps:
                    jax.block_until_ready(metrics)
                if pending is not None:  # the previous log step's row, now that this step is queued
                    log_step(t, cfg, bar, log, clock, mon, *pending)
                    pending = None
                if it % cfg.log_interval == 0:
                    pending = (it, metrics)
                if it == start:  # compilation is not timed
                    jax.block_until_ready(t.state)
                    clock.mark(it, steps=-1)
                it += 1
                clock.steps += 1
                bar.update(1)
    except KeyboardInterrupt:  # a second signal: every save begun has completed (finishing waited)
        t.latest.manager.reload()
        newest = t.latest.all_steps()
        raise KeyboardInterrupt(
            f"training stopped at iter {it}; "
            + (f"the newest checkpoint is iter {newest[0]} in {t.latest.manager.directory}. Continue with "
               f"--init_from=resume --out_dir={cfg.out_dir}" if newest else "no checkpoint was written")) from None
    summary["iter"] = it
    return summary


# ----------------------------------------------------------------------------- the loop's parts

@dataclass
class Training:
    """What the loop carries from step to step and uses: the state, the compiled steps, the
    checkpointers, the best val loss, and what the MFU needs."""
    state: Any
    best_val: float
    train_step: Callable
    eval_step: Callable
    keys: dict
    latest: Checkpointer
    best: Checkpointer
    start: int
    last_saved: int
    sync_steps: bool
    n_params: int
    n_trainable: int
    fpt: float  # FLOPs per token
    peak: float  # the devices' peak FLOP/s
    tokens_per_iter: int
    schedules: dict  # each optimizer's lr schedule by its metrics name (lr, lr_muon)


def build(run: Run, log=print) -> Training:
    """The state (scratch, pretrained, LoRA or resumed), the compiled steps and the checkpointers."""
    cfg = run.cfg
    keys = run_keys(cfg.seed)
    graphdef, abstract, optimizer = abstract_state(run.model_cfg, cfg)
    state_sh = parallel.state_shardings(abstract, run.mesh)
    create = not cfg.eval_only  # an evaluation creates nothing
    latest = Checkpointer(cfg.out_dir, "latest", max_to_keep=2, create=create)
    best = Checkpointer(cfg.out_dir, "best", create=create)
    state, best_val = start_state(run, cfg, abstract, optimizer, state_sh, (latest, best), keys["init"], log)
    n_trainable = num_params(state.params)
    n_params = n_trainable + num_params(state.frozen)
    peak, peak_src = device_peak("float32" if jax.devices()[0].platform == "cpu" else cfg.dtype,
                                 run.mesh.devices.flat)  # MFU of the whole mesh
    describe(run, state, n_params, n_trainable, peak_src, log)
    repl = parallel.replicated(run.mesh)
    start = int(state.step)
    train_step = make_train_step(graphdef, optimizer, cfg, state_sh, parallel.batch_sharding(run.mesh, 3), repl,
                                 masked=run.masked)
    if cfg.memory_check and create and start < cfg.max_iters:
        try:  # the step compiled as it will run, once it is known to fit (jaxgpt.memory)
            train_step = checked_train_step(train_step, graphdef, optimizer, cfg, state, state_sh, run.mesh,
                                            keys["dropout"], checkpoint_copy=True, log=log,
                                            masked=run.masked)
        except BaseException:  # refused (or interrupted while compiling): nothing was written
            latest.close()
            best.close()
            raise
    return Training(
        state=state, best_val=best_val, keys=keys, latest=latest, best=best, train_step=train_step,
        eval_step=make_eval_step(graphdef, state_sh.params, parallel.batch_sharding(run.mesh, 2), repl,
                                 state_sh.frozen, masked=run.masked),
        start=start, last_saved=start,
        sync_steps=parallel.needs_step_sync(run.mesh), n_params=n_params, n_trainable=n_trainable,
        fpt=flops_per_token(run.model_cfg, n_params, n_trainable), peak=peak,
        tokens_per_iter=cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size,
        # compiled, as inside the train step: run op by op, the evaluation row's lr compiled a
        # dozen one-op programs at the first evaluation (~0.3 s on 2 cores)
        schedules={name: jax.jit(s) for name, s in lr_schedules(cfg).items()})


def describe(run: Run, state, n_params: int, n_trainable: int, peak_src: str, log) -> None:
    """Logs the model, LoRA and devices."""
    cfg, mc = run.cfg, run.model_cfg
    log(f"model: {cfg.model_type}, {n_params / 1e6:.2f}M parameters, compute dtype {mc.dtype}, "
        f"attention {mc.attn_impl}; MFU peak {peak_src}")
    if run.lora_base is not None:
        quant = mc.base_quant
        log(f"{'QLoRA' if quant else 'LoRA'} rank {mc.lora_rank} on {mc.lora_targets}: "
            f"{n_trainable:,} trainable parameters ({100 * n_trainable / n_params:.2f}%), base from "
            f"{run.lora_base['source']} frozen"
            + (f", its Linear kernels in {quant} (the frozen base: {parallel.tree_bytes(state.frozen) / 1e6:,.1f} "
               f"MB on the devices)" if quant else ""))
    log(f"devices: {run.mesh.devices.size} ({jax.devices()[0].device_kind}), sharding {cfg.sharding}, "
        f"mesh data={run.mesh.shape['data']} x fsdp={run.mesh.shape['fsdp']}, {jax.process_count()} process(es)")


def evaluate(t: Training, run: Run, it: int) -> dict[str, float]:
    """The mean loss over eval_iters batches of each split (the batches derive from the eval key and it)."""
    ek, n = jax.random.fold_in(t.keys["eval"], it), run.cfg.eval_iters
    out = {}
    for s, split in enumerate(data_lib.SPLITS):
        losses = []
        for i in range(n):
            losses.append(t.eval_step(t.state.params, run.eval_batches[split](ek, s * n + i), t.state.frozen))
            if t.sync_steps:
                jax.block_until_ready(losses[-1])
        out[split] = float(np.mean([parallel.host_value(l) for l in losses]))
    return out


def save(t: Training, run: Run, ckpt: Checkpointer, it: int, signals: StopFlag) -> None:
    """Starts writing checkpoint `it` with everything needed to use it alone (never a frozen LoRA
    base: that is loaded from its source)."""
    cfg = run.cfg
    meta = {"step": it, "best_val_loss": t.best_val, "model_config": run.model_cfg.to_dict(),
            "train_config": cfg.to_dict(), "tokenizer": run.tok_meta,
            "rng": {"seed": cfg.seed, "derivation": "fold_in(key(seed), stream); per step fold_in(stream_key, step)"},
            "data_state": {"step": it}, "lora_base": run.lora_base, "origin": run.origin}
    with signals.deferred():  # a second signal stops after Orbax has taken the state
        ckpt.save(it, t.state.replace(frozen={}), meta)


def check_finite(t: Training, cfg: Config, first_bad=None) -> None:
    """on_nonfinite=stop: end the run, saving nothing, once a step was not finite."""
    bad = int(parallel.host_value(t.state.first_nonfinite if first_bad is None else first_bad))
    if cfg.on_nonfinite == "stop" and bad >= 0:
        raise NonFiniteLoss(f"the loss became non-finite (NaN or inf) at iter {bad}; stopped without saving, "
                            f"so the latest checkpoint (iter {t.last_saved}) is the last good one. Lower "
                            f"--learning_rate, check the data, or pass --on_nonfinite=skip")


def eval_row(t: Training, run: Run, it: int, losses: dict[str, float], ms: float) -> dict[str, Any]:
    """metrics.jsonl's row for an evaluation (docs/monitoring.md has the schema)."""
    return {"kind": "eval", "iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
            **{name: float(s(it)) for name, s in t.schedules.items()}, **speed(t, ms),
            "best_val_loss": t.best_val, "skipped_steps": int(parallel.host_value(t.state.skipped))}


def train_row(t: Training, it: int, m: dict[str, float], ms: float) -> dict[str, Any]:
    """metrics.jsonl's row for log step `it` (docs/monitoring.md has the schema)."""
    return {"kind": "train", "iter": it, "loss": m["loss"], **{name: m[name] for name in t.schedules},
            "grad_norm": m["grad_norm"], **speed(t, ms), "skipped_steps": int(m["skipped"])}


def speed(t: Training, ms: float) -> dict[str, float]:
    """ms/iter, tokens/s and MFU from ms per iteration (NaN where not measured: compiling)."""
    timed = ms == ms
    return {"ms_per_iter": ms, "tokens_per_s": t.tokens_per_iter / ms * 1000 if timed else math.nan,
            "mfu": t.fpt * t.tokens_per_iter / (ms / 1000) / t.peak if timed else math.nan}


class Clock:
    """Training time (steps; not compilation, evaluation or checkpointing): since the last
    evaluation, for its row, and since the last log row, for that one."""

    def __init__(self):
        self.t, self.steps = time.perf_counter(), 0
        self.log_mark = None  # (time, iter): step iter had finished at that time

    def mark(self, done: int, steps: int = 0) -> None:
        """Steps up to `done` have finished now; what follows is training time."""
        self.t, self.steps = time.perf_counter(), steps
        self.log_mark = (self.t, done)

    def ms_per_iter(self) -> float:
        return 1000 * (time.perf_counter() - self.t) / self.steps if self.steps else math.nan

    def since_log(self, it: int) -> float:
        """ms per step since the last mark, now that step `it` has finished (NaN: nothing timed)."""
        now = time.perf_counter()
        ms = 1000 * (now - self.log_mark[0]) / (it - self.log_mark[1]) \
            if self.log_mark is not None and it > self.log_mark[1] else math.nan
        self.log_mark = (now, it)
        return ms


def log_step(t: Training, cfg: Config, bar, log, clock: Clock, mon: Monitor, it: int, metrics) -> None:
    """Log step `it`'s row, read one step later (the device is already busy with the next):
    metrics.jsonl (TensorBoard, wandb) and the progress bar."""
    m = {k: float(v) for k, v in jax.device_get({k: v.addressable_data(0) for k, v in metrics.items()}).items()}
    check_finite(t, cfg, m["first_nonfinite"])
    row = train_row(t, it, m, clock.since_log(it))
    mon.train(row)
    ms = row["ms_per_iter"]
    speed = f"{ms:.1f} ms/iter, {row['tokens_per_s']:,.0f} tok/s" if ms == ms else "compiling"
    if bar.disable:
        log(f"iter {it}: loss {m['loss']:.4f}, lr {m['lr']:.2e}, {speed}")
    else:
        bar.set_postfix_str(f"loss {m['loss']:.4f} lr {m['lr']:.2e} {speed}")

