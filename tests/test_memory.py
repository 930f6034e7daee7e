"""The memory check before the first step (jaxgpt.memory) and activation checkpointing (remat).

A step that needs more than the memory there is (set here by $JAXGPT_MEMORY_LIMIT, never by a real
out-of-memory) is refused in one line that names settings which fit, and those settings then run;
with each remat policy the loss and gradients equal the plain step's, for full, LoRA and QLoRA
training and the modern options, and on 2 devices under dp and fsdp (a subprocess)."""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, subprocess_env, tiny_args
from helpers import run_python
from jaxgpt import memory
from jaxgpt.config import Config, parse_args
from jaxgpt.errors import UserError
from jaxgpt.memory import LIMIT_ENV, Setting, StepMemory, suggest
from jaxgpt.model import REMAT_OFF, REMAT_POLICIES, model_config
from jaxgpt.step import init_state, make_loss_fn, make_train_step
from jaxgpt.trainer import train

POLICIES = sorted(REMAT_POLICIES)


def test_remat_key_accepts_exactly_the_policies():
    for name in (*REMAT_OFF, *REMAT_POLICIES):
        Config.RULES["remat"]("remat", name)
    with pytest.raises(UserError, match="remat"):
        Config.RULES["remat"]("remat", "everything")


# the model variants remat must leave unchanged: (flags, lora_rank, base_quant)
VARIANTS = {
    "full": ([], 0, ""),
    "modern": (["--pos_emb=rope", "--norm=rmsnorm", "--qk_norm=True", "--mlp=swiglu", "--untied_head=True",
                "--logit_softcap=15"], 0, ""),
    "lora": ([], 4, ""),
    "qlora": ([], 4, "nf4"),
}


@functools.cache  # the plain step's result is the reference of every policy: computed once per variant
def loss_and_grads(variant: str, remat: str):
    flags, rank, quant = VARIANTS[variant]
    # C = 64 keeps every kernel a whole number of NF4 blocks; dropout on, so the recomputed
    # forward pass must draw the same masks
    cfg = parse_args(["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=16", "--batch_size=4",
                      "--dropout=0.1", "--lora_dropout=0.1", "--dtype=float32", "--attn_impl=explicit",
                      *flags]).validate()
    mcfg = dataclasses.replace(model_config(cfg, 23, log=lambda s: None), lora_rank=rank, base_quant=quant,
                               lora_dropout=0.1 if rank else 0.0)
    graphdef, state, _ = init_state(mcfg, cfg, jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (4, 16), 0, 23)
    fn = jax.jit(jax.value_and_grad(make_loss_fn(graphdef, remat)))
    return fn(state.params, x, jnp.roll(x, -1, -1), jax.random.key(2), state.frozen)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("remat", POLICIES)
@pytest.mark.slow
def test_remat_gives_the_plain_loss_and_gradients(variant, remat, exact_f32):
    loss0, grads0 = loss_and_grads(variant, "")
    loss, grads = loss_and_grads(variant, remat)
    # the same arithmetic recomputed: equal to float32 rounding (tolerance rtol 1e-5, atol 1e-7)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(grads) == jax.tree.structure(grads0) and jax.tree.leaves(grads0)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-5, atol=1e-7)


def compiled_step_memory(remat: str, batch_size: int = 8) -> StepMemory:
    cfg = parse_args(["--n_layer=4", "--n_head=4", "--n_embd=64", "--block_size=128", f"--batch_size={batch_size}",
                      "--dtype=float32", "--attn_impl=explicit", f"--remat={remat}"]).validate()
    mcfg = model_config(cfg, 65, log=lambda s: None)
    graphdef, state, opt = init_state(mcfg, cfg, jax.random.key(0))
    batch = jnp.zeros((1, batch_size, 128), jnp.int32)
    return StepMemory.of(make_train_step(graphdef, opt, cfg).lower(state, (batch, batch), jax.random.key(1)).compile())


@pytest.mark.slow
def test_remat_keeps_fewer_activations():
    plain, block, dots = (compiled_step_memory(r) for r in ("", "block", "dots"))
    # 4 blocks whose attention scores (B, H, T, T) dominate: keeping only the blocks' inputs must
    # cut the temporaries well below the plain step's; keeping the matmul outputs lies in between
    assert block.temporaries < 0.6 * plain.temporaries, (block, plain)
    assert dots.temporaries < plain.temporaries, (dots, plain)
    assert block.arguments == plain.arguments  # the same state and batch


@pytest.mark.slow
def test_the_need_grows_with_the_batch():
    small, large = compiled_step_memory("", 2), compiled_step_memory("", 8)
    assert large.temporaries > 2 * small.temporaries and large.arguments > small.arguments


# ---------------------------------------------------------------------------------------------
# choosing settings that fit (a made-up need, so each case is exact)


def fake_need(fixed, per, calls, curve=0.0):
    per = {"": per, "dots": per / 2, "block": per / 4} if not isinstance(per, dict) else per

    def need(s: Setting) -> int:
        calls.append(s)
        b = s.batch_size
        return int(fixed + per[s.remat] * b + curve * b * b + 10 * s.accum)

    return need


@pytest.mark.parametrize("budget, batch, remat", [(1500, 4, "block"), (1650, 6, "dots")])
def test_suggest_picks_the_largest_micro_batch_that_fits_at_the_same_tokens(budget, batch, remat):
    calls = []
    need = fake_need(1000, 100, calls)  # 1000 + 100 b (+ 10 per micro-batch); dots 50 b, block 25 b
    out = suggest(need, Setting(12, 1, ""), budget=budget, n_batch=1)
    compiles = len(calls)  # each one a compile in a real run
    s, n = out[0]
    assert s == Setting(batch, 12 // batch, "") and n <= budget  # the next larger divisor of 12 does not fit
    # at the same batch the faster policy that fits is named too (dots fits only the larger budget)
    assert [x[0] for x in out[1:]] == [Setting(12, 1, remat)]
    assert all(need(x) <= budget for x, _ in out)
    assert compiles <= 6


def test_suggest_checks_its_pick_when_the_need_is_not_affine():
    calls = []
    # convex in the batch: the line through b=1 and b=12 promises more than fits, so the pick is verified
    out = suggest(fake_need(100, 10, calls, curve=8.0), Setting(12, 2, ""), budget=420, n_batch=2)
    settings = [s for s, _ in out]
    assert settings and all(s.batch_size * s.accum == 24 and s.batch_size % 2 == 0 for s in settings)
    for s, n in out:
        assert n <= 420 and fake_need(100, 10, [], curve=8.0)(s) == n


def test_suggest_offers_remat_at_a_larger_batch_and_nothing_when_nothing_fits():
    calls = []
    per = {"": 300, "dots": 200, "block": 50}
    out = suggest(fake_need(1000, per, calls), Setting(8, 1, ""), budget=1400, n_batch=1)
    assert [s for s, _ in out] == [Setting(1, 8, ""), Setting(4, 2, "block")]
    assert suggest(fake_need(10**6, 1, []), Setting(8, 1, ""), budget=1000, n_batch=1) == []


def test_parse_bytes():
    assert memory.parse_bytes("1000") == 1000
    assert memory.parse_bytes("8G") == memory.parse_bytes("8GiB") == 8 * 2**30
    assert memory.parse_bytes("1.5m") == int(1.5 * 2**20)
    with pytest.raises(UserError, match=LIMIT_ENV):
        memory.parse_bytes("lots")


# ---------------------------------------------------------------------------------------------
# the check in a run: refused before any step, in one line, naming a batch that fits, which runs

def refusal(tmp_path, corpus_file, limit, monkeypatch, **flags):
    monkeypatch.setenv(LIMIT_ENV, str(limit))
    args = tiny_args(tmp_path, corpus_file, **{"n_layer": 2, "block_size": 64, "batch_size": 16, "cpu_devices": 0,
                                               **flags})
    with pytest.raises(UserError) as e:
        train(parse_args(args), log=lambda s: None)
    return str(e.value)


def need_bytes(msg: str) -> float:
    return memory.parse_bytes(re.search(r"needs about ([0-9.]+ [KMGT]iB)", msg).group(1).replace(" ", ""))


@pytest.mark.slow
def test_a_step_over_the_limit_is_refused_naming_a_batch_that_fits_which_then_runs(tmp_path, corpus_file,
                                                                                      monkeypatch):
    # nothing fits in 1 KiB: the line says so, before any step (no checkpoint, no metrics written)
    msg = refusal(tmp_path / "a", corpus_file, 1024, monkeypatch)
    assert "\n" not in msg and "no smaller batch_size or remat setting fits" in msg and "memory_check=False" in msg
    assert not os.path.exists(tmp_path / "a" / "out" / "metrics.jsonl")
    need16 = need_bytes(msg)
    # a limit under the need at batch 16 but far above the state: a smaller micro-batch fits
    limit = int(0.6 * need16 / memory.MEMORY_SHARE)
    msg = refusal(tmp_path / "b", corpus_file, limit, monkeypatch)
    assert "\n" not in msg and "needs about" in msg
    m = re.search(r"pass --batch_size=(\d+) --gradient_accumulation_steps=(\d+) \(about", msg)
    assert m, msg
    b, a = int(m.group(1)), int(m.group(2))
    assert b * a == 16 and b < 16
    # ... which runs under the same limit
    log = []
    args = tiny_args(tmp_path / "c", corpus_file, n_layer=2, block_size=64, batch_size=b,
                     gradient_accumulation_steps=a, max_iters=2, eval_interval=2)
    summary = train(parse_args(args), log=log.append)
    assert summary["iter"] == 2
    assert any(line.startswith("memory check: the train step needs about") for line in log), log
    # and the check can be turned off: the same 1 KiB limit no longer stops the run
    args = tiny_args(tmp_path / "d", corpus_file, n_layer=2, block_size=64, batch_size=16, max_iters=2,
                     eval_interval=2, memory_check=False)
    monkeypatch.setenv(LIMIT_ENV, "1024")
    assert train(parse_args(args), log=lambda s: None)["iter"] == 2


@pytest.mark.slow
def test_train_py_and_bench_py_refuse_in_one_line_without_a_traceback(tmp_path, corpus_file):
    env = subprocess_env(**{LIMIT_ENV: "1K", "JAX_PLATFORMS": "cpu"})
    for cmd in ([os.path.join(ROOT, "train.py"), *tiny_args(tmp_path, corpus_file)],
                [os.path.join(ROOT, "bench.py"), "--config", os.path.join(ROOT, "configs", "shakespeare_char_cpu.py"),
                 "--n_layer=1", "--steps=1"]):
        r = run_python(cmd, timeout=300, env=env)
        assert r.returncode == 2, r.stderr[-2000:]
        err = [line for line in r.stderr.splitlines() if line.strip()]
        # the error is one line, the last; a warning of JAX's own (seen once in a busy session) may precede it
        errors = [line for line in err if line.startswith("error:")]
        assert len(errors) == 1 and err[-1] == errors[0], r.stderr[-2000:]
        assert errors[0].startswith("error: the train step needs about"), r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "ms/iter" not in r.stdout


@pytest.mark.slow
def test_remat_per_device_under_dp_and_fsdp():
    """2 CPU devices (a subprocess): remat's steps equal the plain ones under dp and fsdp, and the
    check counts both devices' share of the host's memory."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "remat_worker.py")], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env=subprocess_env(JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    for sharding in ("dp", "fsdp"):
        plain = report[sharding][""]
        for remat in POLICIES:
            # a few steps of the same arithmetic: equal to float32 rounding (rtol 1e-5)
            np.testing.assert_allclose(report[sharding][remat], plain, rtol=1e-5, err_msg=f"{sharding} {remat}")
    assert report["sharing_2_over_1"] > 1.9  # two devices on one host need twice one device's bytes


def test_suggest_from_dots_offers_block():
    # remat=dots does not fit and no smaller micro-batch does either: the stronger policy is named
    per = {"": 300, "dots": 200, "block": 50}
    out = suggest(fake_need(1000, per, []), Setting(4, 1, "dots"), budget=1230, n_batch=1)
    assert [s for s, _ in out] == [Setting(4, 1, "block")]
