"""What a run shows while it trains: metrics.jsonl, TensorBoard, wandb, loss.png, and profiles.

    with Monitor(cfg, start, main, log) as mon:   # opens what cfg asks for (process 0 only)
        mon.profile(it, state)                    # every iteration: starts or stops --profile's trace
        mon.train(row)                            # a log step's row: {"iter", "loss", "lr", ...}
        mon.eval(row)                             # an evaluation's row; loss.png is redrawn

The trainer builds the rows (one schema, docs/monitoring.md: a "kind" field, "train" or "eval");
this module only writes them: a line of metrics.jsonl each, flushed (`tail -f` follows it); the
same figures as TensorBoard scalars `<kind>/<key>` at step `iter` (tensorboard=True) and to wandb
(wandb_log=True), unmeasured ones (NaN) left out. A resumed run continues all of them from its
checkpoint's iteration: metrics.jsonl loses the rows of steps the checkpoint does not hold (a run
killed after it saved), TensorBoard gets a restart marker (a SessionLog START at that step, which
makes TensorBoard drop its later points) and the evaluation at that step again.

TensorBoard's events are written with the `tensorboard` package's own event writer (no
TensorFlow, nor tensorboardX: viewing needs `tensorboard` anyway, and it imports in a sixth of the
time; docs/monitoring.md has the comparison). tensorboard and wandb are optional: asked for and not
installed, one line says how to install them and training goes on. In a job of several processes
only process 0 writes (main=False makes every call a no-op).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any, Callable

import jax

from jaxgpt.config import Config, profile_range
from jaxgpt.rundir import writing

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PROFILE = "profile"
PLOT = "loss.png"


def read_rows(path: str) -> list[dict[str, Any]]:
    """metrics.jsonl's rows (a row from before the "kind" field is an evaluation's). A line that is
    not a whole row (the last one of a run killed while writing it) is left out."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("iter"), int):
                rows.append({"kind": "eval", **row} if "kind" not in row else row)
    return rows


def eval_rows(path: str) -> list[dict[str, Any]]:
    return [r for r in read_rows(path) if r["kind"] == "eval"]


def kept_on_resume(row: dict[str, Any], start: int) -> bool:
    """Whether a row belongs to a run resumed from the checkpoint of iteration `start`: a train row
    is step `iter`'s (done again after `start`), an evaluation row the state after `iter` steps."""
    return row["iter"] < start or (row["iter"] == start and row["kind"] == "eval")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's figures as TensorBoard tags / wandb keys: `<kind>/<key>`, measured ones only."""
    return {f"{row['kind']}/{k}": float(v) for k, v in row.items()
            if k not in ("kind", "iter") and isinstance(v, (int, float)) and math.isfinite(v)}


class Monitor:
    """The writers of one run (see the module docstring); a context manager that closes them."""

    def __init__(self, cfg: Config, start: int, main: bool = True, log: Callable[[str], None] = print):
        self.cfg, self.main, self.log = cfg, main, log
        self.metrics_path = os.path.join(cfg.out_dir, METRICS)
        self.png = os.path.join(cfg.out_dir, PLOT)
        self.file = self.tb = self.wandb = None
        self.profiler = Profiler(cfg.profile if main else "", cfg.out_dir, log)
        self.plot_failed = False
        if not main:
            return
        resumed = cfg.init_from == "resume"
        kept = self._start_metrics(start, resumed)
        if cfg.tensorboard:
            self.tb = tensorboard_writer(os.path.join(cfg.out_dir, TENSORBOARD), start if resumed else None, log)
            if self.tb is not None:  # what TensorBoard drops at the restart marker, or all if it had nothing
                for row in (r for r in kept if r["iter"] >= start or self.tb.fresh):
                    self.tb.write(row)
        if cfg.wandb_log:
            self.wandb = wandb_run(cfg, log)

    def _start_metrics(self, start: int, resumed: bool) -> list[dict[str, Any]]:
        """metrics.jsonl opened to append: a fresh run's emptied (and its TensorBoard events with
        it), a resumed run's cut to the rows its checkpoint holds; returns the rows kept."""
        kept = []
        with writing("metrics", self.metrics_path):
            if not resumed:
                for name in (METRICS, TENSORBOARD):
                    path = os.path.join(self.cfg.out_dir, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    elif os.path.lexists(path):
                        os.remove(path)
            elif os.path.exists(self.metrics_path):
                with open(self.metrics_path, "rb") as f:
                    lines = sum(1 for _ in f)
                kept = [r for r in read_rows(self.metrics_path) if kept_on_resume(r, start)]
                if len(kept) < lines:  # rewritten whole (without a torn last line too), then put in place
                    tmp = self.metrics_path + ".tmp"
                    with open(tmp, "w", encoding="utf-8") as f:
                        f.writelines(json.dumps(r) + "\n" for r in kept)
                    os.replace(tmp, self.metrics_path)
            self.file = open(self.metrics_path, "a", encoding="utf-8")
        return kept

    def train(self, row: dict[str, Any]) -> None:
        """A log step's row."""
        self._write(row)

    def eval(self, row: dict[str, Any]) -> None:
        """An evaluation's row; loss.png is redrawn from metrics.jsonl's evaluations."""
        self._write(row)
        if self.main:
            self.plot()

    def _write(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        with writing("metrics", self.metrics_path):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.tb is not None:
            self._guard("tb", "TensorBoard events", lambda: self.tb.write(row))
        if self.wandb is not None:
            self._guard("wandb", "wandb", lambda: self.wandb.log(scalars(row), step=row["iter"]))

    def _guard(self, name: str, what: str, fn) -> None:
        """fn(), or, if it fails, one line and no more of `what` (metrics.jsonl has everything)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- a view of the run must not end it
            self.log(f"warning: stopped writing {what} ({type(e).__name__}: {e}); training goes on, "
                     f"metrics.jsonl has the figures")
            setattr(self, name, None)

    def plot(self) -> None:
        """loss.png from the evaluations so far. Never stops the run: a failure is said once."""
        try:
            plot_losses(self.metrics_path, self.png)
        except Exception as e:  # noqa: BLE001 -- the plot is a view; the run and its metrics matter
            if not self.plot_failed:
                self.log(f"warning: cannot draw {self.png} ({type(e).__name__}: {e}); training goes on, "
                         f"metrics.jsonl has the figures")
            self.plot_failed = True

    def profile(self, it: int, state) -> bool:
        """Before iteration `it`: starts --profile's trace at its START, stops it at its STOP (waiting
        for the steps before); True if it did."""
        return self.profiler.at(it, state)

    def close(self, failed: bool = False) -> None:
        self.profiler.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
        self.file = self.tb = self.wandb = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, typ, *exc) -> None:
        self.close(failed=typ is not None)


# ----------------------------------------------------------------------------- TensorBoard

class EventWriter:
    """TensorBoard event files in `logdir`, written by tensorboard's own EventFileWriter (a thread
    writes them; flushed every few seconds and at close). One Event per row, its figures as scalars."""

    def __init__(self, logdir: str, purge_step: int | None):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.Event, self.Summary = Event, Summary
        self.fresh = not (os.path.isdir(logdir) and any(n.startswith("events.") for n in os.listdir(logdir)))
        self.writer = EventFileWriter(logdir, flush_secs=5)
        if purge_step is not None and not self.fresh:  # TensorBoard drops what the earlier run logged from here on
            self.writer.add_event(Event(wall_time=time.time(), step=purge_step,
                                        session_log=SessionLog(status=SessionLog.START)))

    def write(self, row: dict[str, Any]) -> None:
        values = [self.Summary.Value(tag=tag, simple_value=v) for tag, v in scalars(row).items()]
        self.writer.add_event(self.Event(wall_time=time.time(), step=row["iter"], summary=self.Summary(value=values)))

    def close(self) -> None:
        self.writer.close()


def tensorboard_writer(logdir: str, purge_step: int | None, log) -> EventWriter | None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        log("warning: tensorboard=True needs the tensorboard package: pip install tensorboard (or pip install -e "
            "'.[monitor]'); training goes on without TensorBoard events")
        return None
    return EventWriter(logdir, purge_step)


# ----------------------------------------------------------------------------- wandb

def wandb_run(cfg: Config, log):
    """A wandb run (nanoGPT's keys: wandb_project, wandb_run_name, the config), or None with one line
    saying why. wandb reads WANDB_MODE itself (offline: no network); its files go to WANDB_DIR, else
    out_dir/wandb."""
    try:
        import wandb
    except ImportError:
        log("warning: wandb_log=True needs the wandb package: pip install wandb (or pip install -e '.[monitor]'); "
            "training goes on without wandb")
        return None
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=cfg.to_dict(),
                          dir=None if os.environ.get("WANDB_DIR") else cfg.out_dir)
    except Exception as e:  # noqa: BLE001 -- no login, no network: the run matters more than its dashboard
        log(f"warning: wandb could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"training goes on without it. Run `wandb login`, or set WANDB_MODE=offline to log without a network")
        return None


# ----------------------------------------------------------------------------- loss.png

def plot_losses(metrics_path: str, png_path: str) -> None:
    """loss.png: train and val loss of metrics.jsonl's evaluations, written whole (a temporary file
    renamed), so a viewer never reads half a picture."""
    rows = eval_rows(metrics_path)
    if not rows:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    it = [r["iter"] for r in rows]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(it, [r["train_loss"] for r in rows], label="train")
    ax.plot(it, [r["val_loss"] for r in rows], label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.96)  # fixed margins: cheaper than tight_layout
    tmp = png_path + ".tmp.png"
    with writing("the loss plot", png_path):
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, png_path)


# ----------------------------------------------------------------------------- profiles

class Profiler:
    """--profile=START:STOP: a JAX profiler trace of steps START to STOP - 1 under out_dir/profile
    (plugins/profile/<time>/: an .xplane.pb for TensorBoard's profile plugin, perfetto_trace.json.gz
    for ui.perfetto.dev). `at(i, state)` is called before step i: the trace starts at the first step
    in the range (a resumed run past START starts at once) and stops once step STOP - 1 has finished."""

    def __init__(self, spec: str, out_dir: str, log=print):
        self.range = profile_range(spec)
        self.dir = os.path.join(out_dir, PROFILE)
        self.log, self.active, self.done, self.last = log, False, False, None

    def at(self, i: int, state) -> bool:
        """Starts or stops the trace before step i; True if it did (the time it took is not training time)."""
        if self.range is None or self.done:
            return False
        self.last = i
        start, stop = self.range
        if self.active and i >= stop:
            jax.block_until_ready(state)  # the traced steps have run
            self.stop(i)
            return True
        elif not self.active and start <= i < stop:
            jax.block_until_ready(state)  # the trace holds steps from i on, whole
            with writing("the profile", self.dir):
                os.makedirs(self.dir, exist_ok=True)
                jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
            self.active, self.first = True, i
            return True
        return False

    def stop(self, i: int) -> None:
        with writing("the profile", self.dir):
            jax.profiler.stop_trace()
        self.active, self.done = False, True
        self.log(f"profile: steps {self.first} to {i - 1} traced in {self.dir} (tensorboard --logdir {self.dir}, "
                 f"or perfetto_trace.json.gz at ui.perfetto.dev)")

    def close(self) -> None:
        """The run ended: a trace still running stops here (after the last step it reached); a range
        never reached is said."""
        if self.active:
            self.stop(self.last)
        elif self.range is not None and not self.done:
            self.log(f"profile: the run ended before step {self.range[0]}; no trace written")
            self.done = True
