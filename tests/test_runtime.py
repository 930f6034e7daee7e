"""What depends on the machine: dtype='auto', the attention implementation for each platform and
dtype, matmul precision, and the persistent compilation cache the scripts share."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_args
from jaxgpt import runtime
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.loading import load as load_model
from jaxgpt.config import parse_args
from jaxgpt.errors import UserError
from jaxgpt.model import pick_attention
from jaxgpt.trainer import train
from helpers import run_script


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpus():
    assert runtime.resolve_dtype("auto", "cpu") == "float32"
    assert runtime.resolve_dtype("auto", "gpu") == runtime.resolve_dtype("auto", "tpu") == "bfloat16"
    for platform in ("cpu", "gpu", "tpu"):
        assert runtime.resolve_dtype("float32", platform) == "float32"
        assert runtime.resolve_dtype("bfloat16", platform) == "bfloat16"
    assert parse_args([]).dtype == "auto"


def works(dtype, head_size):
    return None


def fails(dtype, head_size):
    return "RuntimeError: no cuDNN here"


def never(dtype, head_size):
    raise AssertionError("probed cuDNN for a dtype or head size it cannot serve")


@pytest.mark.parametrize("platform, dtype, head_size, probe, expected", [
    ("cpu", "float32", 64, never, "explicit"),
    ("cpu", "bfloat16", 64, never, "explicit"),
    ("gpu", "float32", 64, never, "xla"),  # cuDNN flash attention has no float32 kernel: never picked
    ("gpu", "bfloat16", 64, works, "cudnn"),
    ("gpu", "bfloat16", 64, fails, "xla"),  # the probe failed at this dtype and head size
    ("gpu", "bfloat16", 12, never, "xla"),  # not a multiple of 8
    ("gpu", "bfloat16", 512, never, "xla"),  # too large a head
    ("tpu", "bfloat16", 64, never, "xla"),  # splash: head sizes a multiple of 128 only
    ("tpu", "bfloat16", 128, never, "splash"),
    ("tpu", "float32", 256, never, "splash"),
    ("gpu", "bfloat16", 128, works, "cudnn"),  # splash is a TPU kernel: never picked elsewhere
    ("cpu", "bfloat16", 128, never, "explicit"),
])
def test_auto_attention_serves_the_dtype_and_head_size(platform, dtype, head_size, probe, expected):
    notes = []
    assert pick_attention("auto", dtype, head_size, platform=platform, probe=probe, log=notes.append) == expected
    assert bool(notes) == (probe is fails)  # a failed probe says why it falls back


def test_a_named_implementation_is_kept_or_refused_in_one_line():
    assert pick_attention("explicit", "float32", 64, platform="gpu", probe=never) == "explicit"
    assert pick_attention("xla", "float32", 64, platform="cpu", probe=never) == "xla"
    assert pick_attention("cudnn", "bfloat16", 64, platform="gpu", probe=never) == "cudnn"
    for platform, dtype, head_size, message in [
            ("gpu", "float32", 64, "attn_impl=cudnn needs dtype=bfloat16 .*pass --dtype=bfloat16, or --attn_impl=auto"),
            ("gpu", "bfloat16", 20, "multiple of 8 and at most 256, got 20; pass --attn_impl=auto"),
            ("cpu", "bfloat16", 64, "needs an NVIDIA GPU, but this run is on cpu; pass --attn_impl=auto")]:
        with pytest.raises(UserError, match=message):
            pick_attention("cudnn", dtype, head_size, platform=platform, probe=never)
    assert pick_attention("splash", "bfloat16", 64, platform="tpu", probe=never) == "splash"
    for platform in ("cpu", "gpu"):
        with pytest.raises(UserError, match=f"attn_impl=splash needs a TPU .* on {platform}; pass --attn_impl=auto"):
            pick_attention("splash", "bfloat16", 128, platform=platform, probe=never)


@pytest.mark.slow
def test_the_resolved_dtype_is_what_the_run_records(tmp_path, corpus_file):
    cfg = parse_args(tiny_args(tmp_path, corpus_file, max_iters=2, eval_interval=2))
    train(cfg, log=lambda s: None)
    resolved = runtime.resolve_dtype("auto")
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == resolved
    meta = Checkpointer(cfg.out_dir, "latest").restore_meta()
    assert meta["train_config"]["dtype"] == meta["model_config"]["dtype"] == resolved
    # resuming with the default again, and sampling, see a concrete dtype
    assert load_model(cfg.out_dir)[2].dtype == resolved


@pytest.mark.slow  # the fast tier's budget: among its longest (--durations, 2026-12-02)
def test_bfloat16_compute_keeps_parameters_optimizer_state_logits_and_loss_float32():
    from flax import nnx

    from jaxgpt.model import ModelConfig
    from jaxgpt.step import abstract_state, init_state, make_train_step

    cfg = parse_args(["--dtype=bfloat16", "--warmup_iters=0"])
    mcfg = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, dtype="bfloat16")
    graphdef, _, optimizer = abstract_state(mcfg, cfg)
    state = jax.jit(lambda k: init_state(mcfg, cfg, k)[1])(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (1, 2, 8), 0, 11)
    state, metrics = make_train_step(graphdef, optimizer, cfg)(state, (x, x), jax.random.key(2))
    f32 = {jnp.dtype("float32")}
    assert {a.dtype for a in jax.tree.leaves(state.params)} == f32
    assert {a.dtype for a in jax.tree.leaves(state.opt_state) if a.ndim} == f32
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    model = nnx.merge(graphdef, state.params)
    assert model.h[0].mlp.c_fc.dtype == jnp.bfloat16  # the matmuls compute in bf16
    assert model(x[0]).dtype == jnp.float32


def test_matmul_precision_applies_to_the_whole_run(tmp_path, corpus_file, monkeypatch):
    import jaxgpt.trainer as trainer

    seen = []

    def setup(cfg, log):  # what the run does first inside train: note the precision, then stop there
        seen.append(jax.config.jax_default_matmul_precision)
        raise StopIteration

    monkeypatch.setattr(trainer, "setup", setup)
    for precision in ("highest", "default"):
        with pytest.raises(StopIteration):
            train(parse_args(tiny_args(tmp_path, corpus_file, matmul_precision=precision)), log=lambda s: None)
    assert seen == ["highest", None]  # 'default' leaves JAX's own choice alone


def test_cache_dir_settings():
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "jaxgpt", "xla")
    assert runtime.cache_dir("", {}) == home_cache
    assert runtime.cache_dir("", {"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/jaxgpt/xla"
    assert runtime.cache_dir("", {"JAX_COMPILATION_CACHE_DIR": "/y", "XDG_CACHE_HOME": "/x"}) == "/y"
    assert runtime.cache_dir("/z/c", {"JAX_COMPILATION_CACHE_DIR": "/y"}) == "/z/c"
    assert runtime.cache_dir("off", {"JAX_COMPILATION_CACHE_DIR": "/y"}) is None


def cache_entries(path):
    return sorted(f for f in os.listdir(path) if f.endswith("-cache")) if os.path.isdir(path) else []


@pytest.mark.slow  # train.py as processes
def test_a_second_run_in_a_fresh_process_loads_its_programs_from_the_cache(tmp_path, corpus_file):
    """train.py then sample.py, each twice in a new process with the same shapes: the first run of
    each writes its compiled programs to the cache, the second finds every one of them there."""
    cache = tmp_path / "cache"
    # every program is written (JAX's time threshold would make the count depend on the machine's speed)
    from conftest import subprocess_env

    env = subprocess_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    counts = []
    for run in ("a", "b"):
        r = run_script("train.py", f"--compile_cache={cache}",
                       *tiny_args(tmp_path / run, corpus_file, data_dir=str(tmp_path / "data"), max_iters=3,
                                  eval_interval=3), env=env)
        assert r.returncode == 0, r.stderr
        counts.append(len(cache_entries(cache)))
    for run in ("a", "b"):
        r = run_script("sample.py", f"--compile_cache={cache}", f"--out_dir={tmp_path / 'a' / 'out'}",
                       "--num_samples=2", "--max_new_tokens=40", env=env)
        assert r.returncode == 0, r.stderr
        counts.append(len(cache_entries(cache)))
    assert any(f.startswith("jit_train_step-") for f in cache_entries(cache))
    assert counts[0] > 0 and counts[1] == counts[0], counts  # training: written once, then all hits
    assert counts[2] > counts[1] and counts[3] == counts[2], counts  # sampling's programs: the same
