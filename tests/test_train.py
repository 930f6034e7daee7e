"""End-to-end: train.py and sample.py on a tiny model and a synthetic corpus."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_args
from helpers import SEP, engine_texts, evaluations, run_script
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.loading import load as load_model
from jaxgpt.config import Config, parse_args
from jaxgpt.errors import UserError
from jaxgpt.step import abstract_state
from jaxgpt.model import model_config
from jaxgpt.trainer import train


read_metrics = evaluations  # the evaluations' rows


@pytest.mark.slow
def test_train_writes_metrics_checkpoints_and_plot(tmp_path, corpus_file):
    cfg = parse_args(tiny_args(tmp_path, corpus_file))
    summary = train(cfg, log=lambda s: None)
    out = cfg.out_dir
    rows = read_metrics(out)
    assert [r["iter"] for r in rows] == [0, 5, 10]
    for key in ("train_loss", "val_loss", "lr", "ms_per_iter", "tokens_per_s"):
        assert key in rows[-1]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert summary["best_val_loss"] == min(r["val_loss"] for r in rows)
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    assert json.load(open(os.path.join(out, "config.json")))["n_embd"] == 32
    assert Checkpointer(out, "latest").latest_step() == 10


@pytest.mark.slow
def test_checkpoint_save_restore_is_exact(tmp_path, corpus_file):
    cfg = parse_args(tiny_args(tmp_path, corpus_file, max_iters=3, eval_interval=3))
    train(cfg, log=lambda s: None)
    ckpt = Checkpointer(cfg.out_dir, "latest")
    meta = ckpt.restore_meta()
    assert meta["step"] == 3 and meta["tokenizer"]["tokenizer"] == "char"
    assert meta["model_config"]["n_layer"] == 2 and meta["train_config"]["batch_size"] == 4
    _, abstract, _ = abstract_state(model_config(cfg, meta["tokenizer"]["vocab_size"]), cfg)
    state, _ = ckpt.restore(abstract)
    # save the restored state elsewhere and restore again: bit-identical
    other = Checkpointer(str(tmp_path / "copy"), "latest")
    other.save(3, state, meta)
    other.wait()
    again, meta2 = other.restore(abstract)
    assert meta2 == meta
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(again.step) == 3 and jax.tree.leaves(again.opt_state)


@pytest.mark.slow  # the fast tier's budget: among its longest (--durations, 2026-12-02)
@pytest.mark.parametrize("extra", [{}, {"dropout": 0.1, "gradient_accumulation_steps": 2}])
def test_resume_matches_uninterrupted_run(tmp_path, corpus_file, extra):
    full = parse_args(tiny_args(tmp_path / "a", corpus_file, max_iters=8, eval_interval=4, **extra))
    train(full, log=lambda s: None)
    half = parse_args(tiny_args(tmp_path / "b", corpus_file, max_iters=4, eval_interval=4, **extra))
    train(half, log=lambda s: None)
    resumed = parse_args(tiny_args(tmp_path / "b", corpus_file, max_iters=8, eval_interval=4,
                                   init_from="resume", **extra))
    train(resumed, log=lambda s: None)
    a, b = read_metrics(full.out_dir), read_metrics(half.out_dir)
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == [0, 4, 8]
    for ra, rb in zip(a, b):
        assert (ra["train_loss"], ra["val_loss"]) == (rb["train_loss"], rb["val_loss"])
    _, pa, *_ = load_model(full.out_dir, "latest")
    _, pb, *_ = load_model(half.out_dir, "latest")
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_resume_errors(tmp_path, corpus_file):
    with pytest.raises(UserError, match="no checkpoint"):
        train(parse_args(tiny_args(tmp_path, corpus_file, init_from="resume")), log=lambda s: None)
    train(parse_args(tiny_args(tmp_path, corpus_file, max_iters=2)), log=lambda s: None)
    with pytest.raises(UserError, match="n_layer: checkpoint 2, config 3"):
        train(parse_args(tiny_args(tmp_path, corpus_file, init_from="resume", n_layer=3)), log=lambda s: None)


def test_too_short_corpus(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3)
    with pytest.raises(UserError, match="fewer than block_size"):
        train(parse_args(tiny_args(tmp_path, str(short))), log=lambda s: None)


@pytest.mark.slow  # train.py / sample.py as processes
def test_scripts_end_to_end(tmp_path, corpus_file):
    r = run_script("train.py", *tiny_args(tmp_path, corpus_file, max_iters=6, eval_interval=3))
    assert r.returncode == 0, r.stderr
    assert "best val loss" in r.stdout and "config:" in r.stdout
    out = str(tmp_path / "out")
    r = run_script("sample.py", f"--out_dir={out}", "--start=to be", "--num_samples=2", "--max_new_tokens=20")
    assert r.returncode == 0, r.stderr
    expected = engine_texts(out, "to be", max_new_tokens=20, num_samples=2)
    assert len(expected[0]) == 20 and expected[0] != expected[1]
    assert r.stdout == "".join(f"to be{text}\n{SEP}" for text in expected)
    assert "tokens/s" in r.stderr and "generated 40 tokens" in r.stderr
    r = run_script("sample.py", f"--out_dir={out}", "--start=to", "--num_samples=2", "--max_new_tokens=200",
                   "--stop= ", "--stream=True", "--top_p=0.9", "--temperature=1.0")
    assert r.returncode == 0, r.stderr
    streamed, second, rest = r.stdout.split(SEP)
    first_text, second_text = engine_texts(out, "to", max_new_tokens=200, num_samples=2, temperature=1.0,
                                           top_p=0.9, stop=" ")
    assert " " not in second_text and second == f"to{second_text}\n" and rest == ""
    # the streamed sample shows its text up to the stop string (what it shows after it is sample.py's
    # --stream/--stop handling, tested with sample.py)
    assert streamed.startswith(f"to{first_text}")


@pytest.mark.parametrize("args, message", [
    (["train.py", "--n_layers=2"], "did you mean 'n_layer'"),
    (["train.py", "--max_iters=ten"], "max_iters expects an integer"),
    (["train.py", "--config", "nope.py"], "config file not found"),
    (["train.py", "--n_embd=10", "--n_head=3"], "divisible by n_head"),
    (["sample.py", "--out_dir=/nonexistent/run"], "no checkpoint in /nonexistent/run"),
    (["sample.py", "--temperature=-1"], "temperature must be >= 0"),
])
@pytest.mark.slow  # train.py / sample.py as processes
def test_script_errors_are_one_line(args, message):
    r = run_script(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow  # the fast tier's budget: among its longest (--durations, 2026-12-02)
def test_memmap_path_trains_like_the_device_resident_path(tmp_path, corpus_file, monkeypatch):
    """Corpora too big for the devices are read from the memmap on the host (prefetched);
    the batches, and so the losses, are the same as when the corpus sits on the device."""
    import jaxgpt.data as data_lib
    import jaxgpt.start as run_lib

    resident = parse_args(tiny_args(tmp_path / "a", corpus_file, max_iters=6, eval_interval=3,
                                    gradient_accumulation_steps=2))
    train(resident, log=lambda s: None)
    monkeypatch.setattr(data_lib, "RESIDENT_BYTES", 0)
    host = parse_args(tiny_args(tmp_path / "b", corpus_file, max_iters=6, eval_interval=3,
                                gradient_accumulation_steps=2))
    batch = run_lib.setup(host).batches["train"]
    assert isinstance(batch, data_lib.Prefetched)
    train(host, log=lambda s: None)
    a, b = read_metrics(resident.out_dir), read_metrics(host.out_dir)
    assert [(r["train_loss"], r["val_loss"]) for r in a] == [(r["train_loss"], r["val_loss"]) for r in b]


@pytest.mark.slow  # the fast tier's budget: among its longest (--durations, 2026-12-02)
def test_bfloat16_training_keeps_float32_weights_and_tracks_float32(tmp_path, corpus_file):
    """dtype=bfloat16 computes in bfloat16 (the losses differ from float32's) while parameters and
    optimizer state stay float32; the run learns and its losses stay near the float32 run's (bfloat16
    keeps 8 significant bits, ~0.4% per rounding; 0.05 nats after 10 steps leaves room for the sums)."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = parse_args(tiny_args(tmp_path / dtype, corpus_file, dtype=dtype))
        train(cfg, log=lambda s: None)
        runs[dtype] = read_metrics(cfg.out_dir)
    f32, bf16 = runs["float32"], runs["bfloat16"]
    assert [r["iter"] for r in bf16] == [0, 5, 10] and bf16[-1]["val_loss"] < bf16[0]["val_loss"]
    assert [r["val_loss"] for r in bf16] != [r["val_loss"] for r in f32]
    np.testing.assert_allclose([r["val_loss"] for r in bf16], [r["val_loss"] for r in f32], atol=0.05)
    _, params, model_cfg, *_ = load_model(str(tmp_path / "bfloat16" / "out"), "latest")
    assert model_cfg.dtype == "bfloat16" and {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}


@pytest.mark.slow  # train.py / sample.py as processes
def test_cpu_devices_splits_the_cpu_for_train_py(tmp_path, corpus_file):
    """--cpu_devices=2: train.py runs data parallel over two CPU devices (a fresh process: JAX fixes its
    device count at start) and learns; that N devices give the 1-device losses is test_parallel's."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    r = run_script("train.py", *tiny_args(tmp_path, corpus_file, max_iters=6, eval_interval=3, cpu_devices=2),
                   env=env)
    assert r.returncode == 0, r.stderr
    assert "devices: 2 (cpu)" in r.stdout and "mesh data=2 x fsdp=1" in r.stdout, r.stdout
    rows = read_metrics(str(tmp_path / "out"))
    assert [x["iter"] for x in rows] == [0, 3, 6] and rows[-1]["val_loss"] < rows[0]["val_loss"]
