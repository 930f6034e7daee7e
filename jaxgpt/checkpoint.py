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


def load_model(out_dir: str, prefer: str = "best"):
    """Rebuilds a trained model from a checkpoint alone (a LoRA run's: base + adapters, merged).

    Returns (graphdef, params, model_config, tokenizer, meta); `nnx.merge(graphdef, params)`
    is the model.
    """
    from jaxgpt import lora, parallel, pretrained
    from jaxgpt.config import Config
    from jaxgpt.model import ModelConfig, abstract_model, with_attention
    from jaxgpt.step import abstract_state
    from jaxgpt.tokenizer import tokenizer_from_meta

    ckpt, step = find_checkpoint(out_dir, prefer)
    meta = ckpt.restore_meta(step)
    # the attention implementation is the one that works here, not where the run trained
    model_cfg = with_attention(ModelConfig.from_dict(meta["model_config"]))
    train_cfg = Config(**{k: v for k, v in meta["train_config"].items() if k in Config.__dataclass_fields__})
    graphdef, abstract, _ = abstract_state(model_cfg, train_cfg)
    abstract = abstract.replace(frozen={})  # checkpoints never hold a frozen LoRA base
    # onto one device, whatever mesh the run was trained on
    one = parallel.make_mesh("dp", "1")
    state, meta = ckpt.restore(parallel.with_shardings(abstract, parallel.state_shardings(abstract, one)), step)
    ckpt.close()
    params, base = state.params, meta.get("lora_base")
    if base:
        base_params = pretrained.to_params(pretrained.load_weights(base["source"]), model_cfg.block_size)
        lora.check_base(base, base_params)
        params, model_cfg = lora.merge(lora.join(params, base_params), model_cfg)
        graphdef = abstract_model(model_cfg)[0]
    return graphdef, params, model_cfg, tokenizer_from_meta(meta["tokenizer"]), meta


def save_standalone(out_dir: str, params, model_cfg, meta: dict[str, Any]) -> None:
    """Writes params as an ordinary jaxgpt run (a latest checkpoint, with a fresh optimizer state
    so it can be resumed or finetuned further): what export.py writes for a merged LoRA run."""
    import dataclasses

    import jax

    from jaxgpt.config import Config
    from jaxgpt.optim import make_optimizer
    from jaxgpt.step import state_from_params

    if os.path.isdir(checkpoint_dir(out_dir, "latest")):
        raise UserError(f"{out_dir} already holds a run; export to a new directory")
    train_cfg = {**meta["train_config"], "finetune_method": "full", "out_dir": out_dir}
    cfg = Config(**{k: v for k, v in train_cfg.items() if k in Config.__dataclass_fields__})
    state = jax.jit(lambda p: state_from_params(p, make_optimizer(cfg)))(params)
    new_meta = {**meta, "model_config": dataclasses.asdict(model_cfg), "train_config": train_cfg, "lora_base": None,
                "exported_from": meta.get("exported_from", meta["train_config"]["out_dir"])}
    ckpt = Checkpointer(out_dir, "latest")
    ckpt.save(meta["step"], state, new_meta)
    ckpt.wait()
    ckpt.close()
