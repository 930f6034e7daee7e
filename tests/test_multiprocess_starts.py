"""Every way a job opens a checkpoint, in a job of two processes (python -m jaxgpt.launch, CPU
devices, gloo): starting from another run (full, LoRA, QLoRA; 1 device per process and a 2 x 2
mesh), eval_only from a run, sample.py and export.py. Each must give what one process gives, and a
user's mistake is said in one line, once. (Resume and init_from=auto: tests/test_multiprocess.py.)"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, subprocess_env, tiny_args
from helpers import evaluations, run_python
from jaxgpt.config import parse_args
from jaxgpt.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("exact_f32")]
RTOL = 1e-5  # every process sums its share of the batch, in another order than one process


def job(nproc, script, argv, timeout=300):
    """Runs `script argv` as a job of nproc processes; (exit code, stdout, stderr)."""
    env = subprocess_env(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "jaxgpt.launch", f"--nproc={nproc}", "--grace=20", script, *argv]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, out, err


def script(name, argv):
    """The same script as one process (no launcher)."""
    p = run_python([name, *argv], env=subprocess_env(JAX_PLATFORMS="cpu"), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def losses(out_dir):
    return {r["iter"]: (r["train_loss"], r["val_loss"]) for r in evaluations(out_dir)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small trained run: what the jobs start from."""
    from conftest import make_corpus

    d = tmp_path_factory.mktemp("starts")
    corpus = d / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    argv = tiny_args(d, str(corpus), out_dir=str(d / "base"), max_iters=10)
    train(parse_args(argv), log=lambda s: None)
    return d, str(corpus)


def start_args(d, corpus, out, **kw):
    kw = {"batch_size": 8, "eval_interval": 5, "max_iters": 10, "init_from": str(d / "base"), **kw}
    return tiny_args(d, corpus, out_dir=str(d / out), compile_cache="off", **kw)


@pytest.mark.parametrize("method,devices", [("full", 1), ("lora", 2), ("qlora", 1)])
def test_a_job_starts_from_another_run_as_one_process_does(base, method, devices):
    d, corpus = base
    mesh = dict(cpu_devices=2, sharding="fsdp", mesh_shape="2x2") if devices == 2 else dict(cpu_devices=1)
    code, out, err = job(2, "train.py", start_args(d, corpus, f"job-{method}", finetune_method=method, **mesh))
    assert code == 0, err[-3000:]
    assert out.count("done: iter 10") == 1  # process 0 alone reports
    one = start_args(d, corpus, f"one-{method}", finetune_method=method)
    train(parse_args([a for a in one if not a.startswith("--compile_cache")]), log=lambda s: None)
    got, want = losses(d / f"job-{method}"), losses(d / f"one-{method}")
    for it in (0, 5, 10):
        np.testing.assert_allclose(got[it], want[it], rtol=RTOL, err_msg=f"{method}, iter {it}")


def test_eval_only_sample_and_export_in_a_job_match_one_process(base):
    d, corpus = base
    # eval_only from another run's weights: the same losses, said once
    code, out, err = job(2, "train.py", start_args(d, corpus, "eval", eval_only=True, cpu_devices=1))
    assert code == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("iter 0:")]
    assert len(lines) == 1
    one = script("train.py", start_args(d, corpus, "eval1", eval_only=True, cpu_devices=1))
    assert lines == [line for line in one.splitlines() if line.startswith("iter 0:")]
    # sample.py: process 0 samples and prints, as one process does
    flags = [f"--out_dir={d / 'base'}", "--num_samples=2", "--max_new_tokens=12", "--seed=7", "--compile_cache=off"]
    code, out, err = job(2, "sample.py", flags)
    assert code == 0, err[-3000:]
    assert out == script("sample.py", flags)
    # export.py: written once, the same tensors
    code, out, err = job(2, "export.py", [f"--out_dir={d / 'base'}", f"--hf_dir={d / 'hf2'}"])
    assert code == 0, err[-3000:]
    assert out.count("exported") == 1
    script("export.py", [f"--out_dir={d / 'base'}", f"--hf_dir={d / 'hf1'}"])
    from safetensors.numpy import load_file

    a, b = load_file(str(d / "hf1" / "model.safetensors")), load_file(str(d / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_mistake_in_a_job_is_one_line(base):
    d, corpus = base
    for argv in (start_args(d, corpus, "bad", batch_size="x"),  # before the processes join
                 start_args(d, corpus, "bad", init_from=str(d / "no-such-run"))):  # after
        code, out, err = job(2, "train.py", argv)
        assert code == 2
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert len(errors) == 1, err[-3000:]
        assert "Traceback" not in err
