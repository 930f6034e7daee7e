"""Bad input gets one clear line and a non-zero exit; interruptions and faults never lose a run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import export as export_script
import sample as sample_script
import train as train_script
from conftest import ROOT, subprocess_env, tiny_args
from helpers import run_python
from jaxgpt import step as step_lib
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.loading import load as load_model
from jaxgpt.config import parse_args
from jaxgpt.errors import UserError
from jaxgpt.model import ModelConfig
from jaxgpt.pretrained import export_hf
from jaxgpt.trainer import train


def run_main(main, argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def assert_one_line(rc, err, message):
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")


@pytest.fixture
def trained(tmp_path, corpus_file):
    """A tiny run with checkpoints at iters 0, 2, 4 (latest keeps 2 and 4)."""
    cfg = parse_args(tiny_args(tmp_path, corpus_file, max_iters=4, eval_interval=2))
    train(cfg, log=lambda s: None)
    return cfg


def write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_train_bad_inputs(tmp_path, corpus_file, capsys):
    t = lambda **kw: tiny_args(tmp_path, corpus_file, **kw)  # noqa: E731
    cases = [
        (["--n_layers=2"], "did you mean 'n_layer'"),
        (["--max_iters=ten"], "max_iters expects an integer"),
        (["--config", str(tmp_path / "missing.py")], "config file not found"),
        (t(n_embd=10, n_head=3), "n_embd (10) must be divisible by n_head (3)"),
        (t(input_file=str(tmp_path / "none.txt"), data_dir=str(tmp_path / "d1")), "input file not found"),
        (t(input_file=write(tmp_path, "empty.txt", b""), data_dir=str(tmp_path / "d2")), "is empty"),
        (t(input_file=write(tmp_path, "latin.txt", "caf\xe9 " .encode("latin-1") * 50), data_dir=str(tmp_path / "d3")),
         "is not UTF-8"),
        (t(input_file=write(tmp_path, "short.txt", b"abc" * 10), data_dir=str(tmp_path / "d4")), "fewer than block_size + 1"),
        (t(init_from="resume", out_dir=str(tmp_path / "nothing")), "has no checkpoint"),
        (t(dtype="float16"), "dtype must be one of auto, float32, bfloat16"),
        (t(matmul_precision="exact"), "matmul_precision must be one of default, high, highest"),
        (t(attn_impl="cudnn", dtype="float32"), "attn_impl=cudnn needs"),
        (t(mesh_shape="2"), "needs 2 devices but 1 are visible"),
        (t(on_nonfinite="ignore"), "on_nonfinite must be one of stop, skip"),
        (t(init_from=str(tmp_path / "nope")), "is neither scratch, resume, a GPT-2 name"),
        (t(finetune_method="lora"), "trains adapters on a base model; set --init_from"),
        (t(init_from=str(tmp_path)), "holds no GPT-2 weights"),
        (t(model_size="gpt3"), "model_size must be one of gpt2, gpt2-medium, gpt2-large, gpt2-xl"),
        (t(tokenizer="gpt2", tokenizer_dir=str(tmp_path / "nodir"), data_dir=str(tmp_path / "d5")),
         "tokenizer directory not found"),
    ]
    for argv, message in cases:
        assert_one_line(*run_main(train_script.main, argv, capsys), message)


@pytest.mark.slow
def test_other_tokenizer_and_larger_block_size(trained, tmp_path, corpus_file, capsys):
    meta_path = os.path.join(trained.data_dir, "meta.json")
    meta = json.load(open(meta_path))
    other = tmp_path / "other"
    other.mkdir()
    for f in ("train.bin", "val.bin"):
        (other / f).write_bytes(open(os.path.join(trained.data_dir, f), "rb").read())
    json.dump({**meta, "tokenizer": "gpt2"}, open(other / "meta.json", "w"))
    assert_one_line(*run_main(train_script.main, tiny_args(tmp_path, corpus_file, data_dir=str(other),
                                                          out_dir=str(tmp_path / "fresh")), capsys),
                    "prepared with the 'gpt2' tokenizer, not 'char'")
    assert_one_line(*run_main(train_script.main, tiny_args(tmp_path, corpus_file, init_from="resume", block_size=32,
                                                          max_iters=6), capsys),
                    "block_size: checkpoint 16, config 32")


@pytest.mark.slow
def test_sample_bad_inputs(trained, tmp_path, capsys):
    out = f"--out_dir={trained.out_dir}"
    cases = [
        ([f"--out_dir={tmp_path / 'empty'}"], "no checkpoint in"),
        ([out, "--start=to be€"], "outside the vocabulary: '€'"),
        ([out, "--max_new_tokens=0"], "max_new_tokens must be >= 1"),
        ([out, "--temperature=-0.5"], "temperature must be >= 0"),
        ([out, "--top_k=-3"], "top_k must be >= 1"),
        ([out, "--top_p=0"], "top_p must be in (0, 1]"),
        ([out, "--top_p=1.5"], "top_p must be in (0, 1]"),
        ([out, f"--start=FILE:{tmp_path / 'nope.txt'}"], "cannot read prompt file"),
        ([out, "--which=first"], "which must be one of best, latest"),
    ]
    for argv, message in cases:
        assert_one_line(*run_main(sample_script.main, argv, capsys), message)


@pytest.mark.slow
def test_export_bad_inputs(trained, tmp_path, capsys):
    out = f"--out_dir={trained.out_dir}"
    cases = [
        ([out], "pass --hf_dir=DIR (a Hugging Face GPT-2 directory) and/or --jaxgpt_dir=DIR (a jaxgpt out_dir)"),
        ([f"--out_dir={tmp_path / 'empty'}", f"--hf_dir={tmp_path / 'hf'}"], "no checkpoint in"),
        ([out, f"--hf_dir={tmp_path / 'hf'}", "--which=first"], "which must be one of best, latest"),
        # a directory that holds a run is never overwritten, the run's own out_dir included
        ([out, f"--jaxgpt_dir={trained.out_dir}"], f"{trained.out_dir} already holds a run; export to a new directory"),
    ]
    for argv, message in cases:
        assert_one_line(*run_main(export_script.main, argv, capsys), message)
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "empty" / "checkpoints" / "latest")
    assert Checkpointer(trained.out_dir, "latest").all_steps() == [4, 2]
    with pytest.raises(UserError, match="only GPT models export"):
        export_hf({}, ModelConfig(model_type="bigram"), str(tmp_path / "hf"))


def test_debug_flag_shows_the_traceback(capsys):
    with pytest.raises(UserError, match="did you mean"):
        train_script.main(["--n_layers=2", "--debug"])


@pytest.mark.slow  # processes, signals
def test_batch_that_devices_cannot_split():
    # a CPU split into 2 devices (JAX on the CPU also on a machine with a GPU)
    r = run_python(["train.py", "--cpu_devices=2", "--batch_size=3"], timeout=120,
                   env=subprocess_env(JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "batch_size 3 cannot be split over 2 devices" in r.stderr
    assert "Traceback" not in r.stderr


def nan_loss(monkeypatch):
    real = step_lib.model_loss
    monkeypatch.setattr(step_lib, "model_loss", lambda model, x, targets, key, remat="", masked=False: real(model, x, targets, key, remat, masked) * jnp.nan)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(trained, monkeypatch):
    nan_loss(monkeypatch)
    cfg = parse_args(tiny_args_from(trained, init_from="resume", max_iters=8))
    with pytest.raises(UserError, match="non-finite .* at iter 4; stopped without saving, so the latest checkpoint "
                                        r"\(iter 4\) is the last good one"):
        train(cfg, log=lambda s: None)
    assert Checkpointer(trained.out_dir, "latest").all_steps() == [4, 2]


@pytest.mark.slow
def test_nonfinite_steps_can_be_skipped(trained, monkeypatch):
    _, before, *_ = load_model(trained.out_dir, "latest")
    nan_loss(monkeypatch)
    summary = train(parse_args(tiny_args_from(trained, init_from="resume", max_iters=8, on_nonfinite="skip")),
                    log=lambda s: None)
    assert summary["iter"] == 8 and summary["skipped_steps"] == 4
    _, after, *_ = load_model(trained.out_dir, "latest")
    for a, b in zip(np.asarray(jnp.concatenate([x.ravel() for x in jax_leaves(before)])),
                    np.asarray(jnp.concatenate([x.ravel() for x in jax_leaves(after)]))):
        assert a == b


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def tiny_args_from(cfg, **kw):
    base = {k: getattr(cfg, k) for k in ("out_dir", "data_dir", "input_file", "n_layer", "n_head", "n_embd",
                                         "block_size", "batch_size", "eval_iters", "eval_interval", "log_interval",
                                         "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr")}
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(trained, capsys):
    break_state(trained.out_dir, 4)
    logs = []
    summary = train(parse_args(tiny_args_from(trained, init_from="resume", max_iters=6)), log=logs.append)
    assert any("checkpoint at iter 4 is unreadable" in line for line in logs), logs
    assert any("resuming from" in line and "at iter 2" in line for line in logs), logs
    assert summary["iter"] == 6


def break_state(out_dir, step, kind="latest"):
    broken = 0
    for root, _, files in os.walk(os.path.join(out_dir, "checkpoints", kind, str(step))):
        for f in files:
            if "state" in root:
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(0)
                broken += 1
    assert broken


@pytest.mark.slow
def test_corrupt_metadata_falls_back_to_the_previous_checkpoint(trained):
    with open(os.path.join(trained.out_dir, "checkpoints", "latest", "4", "meta", "metadata"), "w") as f:
        f.write('{"step": 4, "best_val')  # a write cut short
    logs = []
    summary = train(parse_args(tiny_args_from(trained, init_from="resume", max_iters=6)), log=logs.append)
    assert any("checkpoint at iter 4 is unreadable" in line for line in logs), logs
    assert any("resuming from" in line and "at iter 2" in line for line in logs), logs
    assert summary["iter"] == 6


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(trained):
    """Every latest and every best checkpoint damaged (with an intact best, resume uses it: test_runs)."""
    for step in (4, 2):
        break_state(trained.out_dir, step)
    (best,) = Checkpointer(trained.out_dir, "best").all_steps()
    break_state(trained.out_dir, best, "best")
    logs = []
    with pytest.raises(UserError, match=rf"no intact checkpoint to resume from in .*best \(tried iters {best}\); "
                                        r"start a new run with --init_from=scratch and another --out_dir"):
        train(parse_args(tiny_args_from(trained, init_from="resume", max_iters=6)), log=logs.append)
    assert sum("is unreadable" in line for line in logs) == 3, logs
    set_aside = sorted(os.listdir(os.path.join(trained.out_dir, "checkpoints", "broken")))  # kept, not deleted
    assert [n.rsplit("-", 1)[0] for n in set_aside] == [f"best-{best}", "latest-2", "latest-4"], set_aside
    assert Checkpointer(trained.out_dir, "latest").all_steps() == []


def test_resume_refuses_data_with_another_tokenizer(trained, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(open(trained.input_file, encoding="utf-8").read() + "Zebra!\n", encoding="utf-8")  # 2 new characters
    argv = tiny_args_from(trained, init_from="resume", max_iters=6, input_file=str(other),
                          data_dir=str(tmp_path / "other_data"))
    with pytest.raises(UserError, match="cannot resume: the data's tokenizer differs from the checkpoint's; point "
                                        "--data_dir at the data the run was trained on"):
        train(parse_args(argv), log=lambda s: None)
    assert Checkpointer(trained.out_dir, "latest").all_steps() == [4, 2]  # nothing set aside: not corruption


def start_training(tmp_path, corpus_file, **kw):
    args = tiny_args(tmp_path, corpus_file, **{"max_iters": 100000, "eval_interval": 1000, "log_interval": 1, **kw})
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=subprocess_env(PYTHONUNBUFFERED="1"))


def wait_for(proc, predicate, timeout=120):
    """Reads the process's output until a line satisfies predicate; returns that line."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if predicate(line):
            return line
    proc.kill()
    raise AssertionError("the training process never printed the expected line")


@pytest.mark.slow  # processes, signals
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, corpus_file):
    proc = start_training(tmp_path, corpus_file)
    wait_for(proc, lambda l: l.startswith("iter 5: loss"))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Continue with --init_from=resume" in out and "Traceback" not in out
    stopped = int(out.split("stopped at iter ")[1].split(";")[0])
    assert stopped >= 6
    assert Checkpointer(str(tmp_path / "out"), "latest").all_steps()[0] == stopped
    summary = train(parse_args(tiny_args(tmp_path, corpus_file, init_from="resume", max_iters=stopped + 2,
                                         eval_interval=1000)), log=lambda s: None)
    assert summary["iter"] == stopped + 2


def held_training(tmp_path, corpus_file, hold, **kw):
    """train.py (through tests/save_blocker.py) that stops inside the checkpoint write `hold`
    ('kind/step:stage'); returns the process once the write is held, and the write's temporary directory."""
    marker = tmp_path / f"held-{hold.replace('/', '-').replace(':', '-')}"
    args = tiny_args(tmp_path, corpus_file, **{"max_iters": 100000, "eval_interval": 3, **kw})
    log = open(tmp_path / "held.log", "a")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "JAXGPT_TEST_HOLD_SAVE": hold, "JAXGPT_TEST_HOLD_SAVE_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, os.path.join("tests", "save_blocker.py"), *args], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 180
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the write {hold} was never held:\n" + open(tmp_path / "held.log").read()[-3000:])
        time.sleep(0.1)
    return proc, marker.read_text()


def kill(proc):
    proc.kill()
    proc.wait(timeout=30)


def reads_back(out_dir, kind):
    _, params, *_ = load_model(out_dir, kind)
    return all(np.isfinite(np.asarray(x)).all() for x in jax_leaves(params))


@pytest.mark.slow  # processes, signals
def test_sigkill_during_a_checkpoint_write_never_loses_a_completed_checkpoint(tmp_path, corpus_file):
    """The process is killed while a checkpoint is being written, every time: the write is held open
    (tests/save_blocker.py) until the kill, first while its files are being written, then once all are
    written but before it is renamed into place. The half-written checkpoint is never listed, the
    completed ones read back whole, and the run resumes from the newest completed one."""
    out_dir = str(tmp_path / "out")
    # killed inside best/3's write: best keeps iter 0 (latest/3, another writer, may have completed meanwhile)
    proc, tmp_dir = held_training(tmp_path, corpus_file, "best/3:write")
    kill(proc)
    assert os.listdir(tmp_dir)  # the write was under way: its files are left on disk
    assert Checkpointer(out_dir, "best").all_steps() == [0]
    assert Checkpointer(out_dir, "latest").all_steps() in ([0], [3, 0])
    assert reads_back(out_dir, "best") and reads_back(out_dir, "latest")
    # resumed, and killed inside latest/6's commit: latest keeps 3 (and 0), best has 3 or 6, all whole
    proc, tmp_dir = held_training(tmp_path, corpus_file, "latest/6:commit", init_from="resume")
    kill(proc)
    assert os.listdir(os.path.join(tmp_dir, "state")) and os.listdir(os.path.join(tmp_dir, "meta"))
    assert Checkpointer(out_dir, "latest").all_steps() == [3, 0]
    assert Checkpointer(out_dir, "best").all_steps()[0] in (3, 6)
    assert reads_back(out_dir, "best") and reads_back(out_dir, "latest")
    logs = []
    summary = train(parse_args(tiny_args(tmp_path, corpus_file, init_from="resume", max_iters=9, eval_interval=3)),
                    log=logs.append)
    assert any(f"resuming from {out_dir} at iter 3" in line for line in logs), logs
    assert summary["iter"] == 9 and Checkpointer(out_dir, "latest").all_steps() == [9, 6]
