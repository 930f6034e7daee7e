"""Checkpoints: the train state as an Orbax pytree, plus JSON metadata beside it.

    out_dir/checkpoints/latest/<step>/   written at every evaluation and at the end (resume)
    out_dir/checkpoints/best/<step>/     written when the val loss improves (sampling)

The metadata holds everything needed to use a checkpoint on its own: the model config, the
train config, the tokenizer metadata, the step, the best val loss and the RNG/data state
(batches and dropout masks are derived from the seed and the step). Orbax writes each step
to a temporary directory and renames it when complete, so a crash never leaves a half
checkpoint in place of a good one.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgpt.errors import UserError

KINDS = ("latest", "best")


def checkpoint_dir(out_dir: str, kind: str) -> str:
    return os.path.abspath(os.path.join(out_dir, "checkpoints", kind))


class Checkpointer:
    """Saves and restores (state, metadata) under out_dir for one kind ('latest' or 'best')."""

    def __init__(self, out_dir: str, kind: str, max_to_keep: int = 1):
        assert kind in KINDS
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(out_dir, kind),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        if step in self.manager.all_steps():  # a rerun of steps after falling back to an older checkpoint
            self.manager.wait_until_finished()
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        if jax.process_count() > 1:
            # the async commits of two managers (latest and best at one step) can wait on each
            # other's cross-process barriers (seen: a 300 s barrier time-out); finish each save first
            self.manager.wait_until_finished()

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
        raise UserError(f"no intact checkpoint to resume from in {self.manager.directory} (tried iters "
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def find_checkpoint(out_dir: str, prefer: str = "best") -> tuple[Checkpointer, int]:
    """The checkpoint to sample from: `prefer` if it exists, else the other kind."""
    order = [prefer] + [k for k in KINDS if k != prefer]
    for kind in order:
        if os.path.isdir(checkpoint_dir(out_dir, kind)):
            ckpt = Checkpointer(out_dir, kind)
            step = ckpt.latest_step()
            if step is not None:
                return ckpt, step
            ckpt.close()
    raise UserError(f"no checkpoint in {out_dir}; train one first with "
                    f"python train.py --config ... --out_dir={out_dir}")
