"""Checkpoints: the train state as an Orbax pytree, plus JSON metadata beside it.

    out_dir/checkpoints/latest/<step>/   written at every evaluation and at the end (resume)
    out_dir/checkpoints/best/<step>/     written when the val loss improves (sampling)

The metadata holds everything needed to use a checkpoint on its own: the model config, the
train config, the tokenizer metadata, the step, the best val loss and the RNG/data state
(batches and dropout masks are derived from the seed and the step). Orbax writes each step
to a temporary directory and renames it when complete, so a crash never leaves a half
checkpoint in place of a good one. A save that fails on the disk (full, read-only) becomes one
UserError line, its temporary directory is removed, and the earlier checkpoints stay listed.
Readers (`readable`) try checkpoints newest first and never move or delete anything.

In a job of several processes the checkpoints a run writes and resumes from are handled by every
process together (Orbax's barriers keep them in step). A checkpoint that is only read (a model for
init_from, a LoRA base, sampling, export, the metadata resume looks at) is read by each process on
its own (`reader=True`: no barrier, onto the process's own device), and the processes then check
that they read the same one (`agree_on`).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import time
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from jaxgpt.errors import UserError
from jaxgpt.rundir import disk_errno, disk_error

KINDS = ("latest", "best")
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Orbax removes a checkpoint beyond max_to_keep file by file; killed midway, that would leave a
# listed step missing pieces. Instead it renames the step into this subdirectory (one atomic
# rename: a listed step is whole or gone), which `wait` then empties.
DELETED = ".deleted"


def _quiet_orbax() -> None:
    """Orbax reports a failed write or read on its background threads as well as to the caller:
    ERROR log lines and, from TensorStore callbacks that outlive their event loop, 'Event loop is
    closed' tracebacks, dozens per failure. The caller's exception is what jaxgpt reports (as one
    line); this silences the echoes, and only those."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    if getattr(sys.unraisablehook, "_jaxgpt_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(u):
        tb, files = u.exc_traceback, [getattr(getattr(u.object, "cr_code", None), "co_filename", "")]
        while tb is not None:
            files.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if ("Event loop is closed" in str(u.exc_value) or disk_errno(u.exc_value) is not None
                or any("orbax" in f or "tensorstore" in f for f in files)):
            return
        previous(u)

    hook._jaxgpt_quiet = True
    sys.unraisablehook = hook


def checkpoint_dir(out_dir: str, kind: str) -> str:
    return os.path.abspath(os.path.join(out_dir, "checkpoints", kind))


class NoIntactCheckpoint(UserError):
    """Every checkpoint of a kind is damaged (restore_intact set each aside)."""


class Checkpointer:
    """Saves and restores (state, metadata) under out_dir for one kind ('latest' or 'best')."""

    def __init__(self, out_dir: str, kind: str, max_to_keep: int = 1, create: bool = True, reader: bool = False):
        """reader=True: this process alone reads (no cross-process barriers, nothing written),
        whatever the other processes of a job do meanwhile."""
        assert kind in KINDS
        _quiet_orbax()
        self.kind, self.in_flight = kind, None  # the step of a save that may still be writing
        if reader:
            me = jax.process_index()
            options = ocp.CheckpointManagerOptions(
                read_only=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=me, active_processes={me}))
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, todelete_subdir=DELETED)
        self.manager = ocp.CheckpointManager(checkpoint_dir(out_dir, kind), options=options)

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Starts writing checkpoint `step` (asynchronously: `wait` for it to be on disk). The
        previous save is finished first (Orbax would wait for it too), so an error is its own."""
        self.wait()
        try:
            if step in self.manager.all_steps():  # a rerun of steps after falling back to an older checkpoint
                self.manager.delete(step)
            self.in_flight = step
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001 -- a disk error becomes one line; others pass
            self._failed(e)
        if jax.process_count() > 1:
            # the async commits of two managers (latest and best at one step) can wait on each
            # other's cross-process barriers (seen: a 300 s barrier time-out); finish each save first
            self.wait()

    def _failed(self, error: Exception):
        """A save failed: its temporary directory goes (it only takes space; the earlier checkpoints
        were never touched), and a disk problem becomes one UserError line."""
        step, self.in_flight = self.in_flight, None
        for tmp in glob.glob(os.path.join(str(self.manager.directory), f"*{TMP_SUFFIX}*")):
            shutil.rmtree(tmp, ignore_errors=True)
        code = disk_errno(error)
        if code is None:
            raise error
        self.manager.reload()
        steps = self.all_steps()
        kept = (f"The {self.kind} checkpoints written before are intact (newest: iter {steps[0]})" if steps
                else f"No {self.kind} checkpoint was written before")
        raise disk_error(f"the {self.kind} checkpoint at iter {step}", str(self.manager.directory), code, kept) from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state, step: int | None = None):
        """Restores the state into the shapes, dtypes and shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def newest_meta(self) -> dict[str, Any] | None:
        """The metadata of the newest checkpoint whose metadata reads back, or None."""
        for step in self.all_steps():
            try:
                return self.restore_meta(step)
            except Exception:  # noqa: BLE001 -- broken: restore_intact sets it aside later
                continue
        return None

    def all_steps(self) -> list[int]:
        """Completed checkpoints, newest first (an interrupted write is never listed)."""
        return sorted(self.manager.all_steps(), reverse=True)

    def restore_intact(self, abstract_state, check_meta=lambda meta: None, log=print):
        """Restores the newest checkpoint that reads back whole; warns about each broken one.

        check_meta(meta) may raise UserError (an incompatible run): that is not corruption and
        stops at once. With no intact checkpoint left this is an error, never a silent restart.
        """
        steps = self.all_steps()
        for step in steps:
            try:
                meta = self.restore_meta(step)
            except Exception as e:  # noqa: BLE001 -- any read failure means a broken checkpoint
                self._set_aside(step, e, log)
                continue
            check_meta(meta)
            try:
                state, meta = self.restore(abstract_state, step)
                return state, meta, step
            except Exception as e:  # noqa: BLE001
                self._set_aside(step, e, log)
        raise NoIntactCheckpoint(f"no intact checkpoint to resume from in {self.manager.directory} (tried iters "
                        f"{', '.join(map(str, steps)) or 'none'}); start a new run with --init_from=scratch "
                        f"and another --out_dir")

    def _set_aside(self, step: int, error: Exception, log) -> None:
        """Moves a broken checkpoint to checkpoints/broken/ (kept for inspection, out of the way)."""
        src = os.path.join(str(self.manager.directory), str(step))
        dst = os.path.join(os.path.dirname(str(self.manager.directory)), "broken",
                           f"{os.path.basename(str(self.manager.directory))}-{step}-{int(time.time())}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        self.manager.reload()
        log(f"warning: checkpoint at iter {step} is unreadable ({type(error).__name__}: {str(error)[:100]}); "
            f"moved it to {dst} and trying an older one")

    def wait(self) -> None:
        """Returns once the save in flight is on disk, complete and renamed into place."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- the background write failed
            self._failed(e)
        self.in_flight = None
        shutil.rmtree(os.path.join(str(self.manager.directory), DELETED), ignore_errors=True)

    def close(self) -> None:
        self.manager.close()


def readable(out_dir: str, prefer: str = "best") -> Iterator[tuple[Checkpointer, int]]:
    """Every listed checkpoint a reader may try, best first: the `prefer` kind newest first, then
    the other kind. Creates, moves and deletes nothing. No checkpoint at all is a UserError."""
    found = False
    for kind in [prefer] + [k for k in KINDS if k != prefer]:
        if not os.path.isdir(checkpoint_dir(out_dir, kind)):
            continue
        ckpt = Checkpointer(out_dir, kind, reader=True)
        try:
            for step in ckpt.all_steps():
                found = True
                yield ckpt, step
        finally:
            ckpt.close()
    if not found:
        raise UserError(f"no checkpoint in {out_dir}; train one first with "
                        f"python train.py --config ... --out_dir={out_dir}")


def listed_steps(out_dir: str) -> dict[str, list[int]]:
    """kind -> the steps listed on disk, newest first, read from the directory names alone."""
    out = {}
    for kind in KINDS:
        d = checkpoint_dir(out_dir, kind)
        names = os.listdir(d) if os.path.isdir(d) else []
        out[kind] = sorted((int(n) for n in names if n.isdigit()), reverse=True)
    return out
