"""checkpoint.py on its own: a train state and its metadata saved and restored exactly, the
newest step found, a broken checkpoint set aside for an older one, a missing one a UserError."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.checkpoint import Checkpointer, readable
from jaxgpt.config import parse_args
from jaxgpt.errors import UserError
from jaxgpt.model import ModelConfig
from jaxgpt.step import abstract_state, init_state

MODEL = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, bias=True)
META = {"step": 3, "best_val_loss": 1.5, "tokenizer": {"tokenizer": "char"}, "lora_base": None}


def state_and_abstract():
    cfg = parse_args(["--learning_rate=1e-3"])
    _, state, _ = init_state(MODEL, cfg, jax.random.key(0))
    state = state.replace(step=jnp.asarray(3, jnp.int32))
    return state, abstract_state(MODEL, cfg)[1]


def test_save_then_restore_gives_the_same_state_and_metadata(tmp_path):
    state, abstract = state_and_abstract()
    ckpt = Checkpointer(str(tmp_path), "latest")
    ckpt.save(3, state, META)
    ckpt.wait()
    assert ckpt.latest_step() == 3 and ckpt.restore_meta() == META
    restored, meta = ckpt.restore(abstract)
    ckpt.close()
    assert meta == META
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    found, step = next(readable(str(tmp_path), "best"))  # no best: falls back to latest
    assert (found.kind, step) == ("latest", 3)


def test_a_broken_checkpoint_is_set_aside_for_an_older_one(tmp_path):
    state, abstract = state_and_abstract()
    ckpt = Checkpointer(str(tmp_path), "latest", max_to_keep=2)
    ckpt.save(1, state, {**META, "step": 1})
    ckpt.save(2, state, {**META, "step": 2})
    ckpt.wait()
    step_dir = os.path.join(str(ckpt.manager.directory), "2")
    for root, _, files in os.walk(step_dir):  # truncate every file of the newest step
        for f in files:
            open(os.path.join(root, f), "w").close()
    warnings = []
    _, meta, step = ckpt.restore_intact(abstract, log=warnings.append)
    ckpt.close()
    assert (step, meta["step"]) == (1, 1) and len(warnings) == 1
    assert os.listdir(os.path.join(str(tmp_path), "checkpoints", "broken"))


def test_no_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in"):
        next(readable(str(tmp_path)))
