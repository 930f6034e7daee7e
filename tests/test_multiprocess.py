"""train.py as one job of several processes on this machine (python -m jaxgpt.launch, CPU
devices, gloo collectives): the same losses as one process, checkpoints that move between
process counts, and a job that ends whole when a process dies or the machine is preempted.

Tiny models: several processes on 2 cores run far slower than one, so each scenario starts as few
jobs as it can; single-process references run in this process."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, subprocess_env, tiny_args
from helpers import evaluations, log_rows
from jaxgpt.config import parse_args
from jaxgpt.trainer import train

pytestmark = [pytest.mark.usefixtures("exact_f32"), pytest.mark.slow]  # slow: jobs of 2 and 4 processes
# every process sums its share of the batch; the order of the sums differs from one process's
RTOL = 1e-5


def args(tmp_path, corpus_file, out, **kw):
    kw = {"batch_size": 8, "eval_interval": 5, "max_iters": 10, **kw}
    return tiny_args(tmp_path, corpus_file, out_dir=str(tmp_path / out), compile_cache="off", **kw)


JOBS = []  # every job started, so that none outlives its test


@pytest.fixture(autouse=True)
def no_job_left_behind():
    yield
    while JOBS:
        p = JOBS.pop()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and its processes
            p.wait()


def launch(nproc, argv):
    env = subprocess_env(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "jaxgpt.launch", f"--nproc={nproc}", "--grace=20", "train.py",
                          *argv], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    JOBS.append(p)
    return p


def run_job(nproc, argv, timeout=300):
    p = launch(nproc, argv)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return out, err


def in_process(argv):
    cfg = parse_args([a for a in argv if not a.startswith("--compile_cache")])
    train(cfg, log=lambda s: None)
    return cfg.out_dir


def losses(out_dir):
    return {r["iter"]: (r["train_loss"], r["val_loss"]) for r in evaluations(out_dir)}


def assert_same(a, b, iters):
    for it in iters:
        np.testing.assert_allclose(a[it], b[it], rtol=RTOL, err_msg=f"iter {it}")


def test_processes_match_one_process_and_checkpoints_move_between_counts(tmp_path, corpus_file):
    # one process, one device: 10 steps, then resumed to 15 in a job of 2 processes (1 -> 2)
    ref = in_process(args(tmp_path, corpus_file, "ref"))
    shutil.copytree(ref, tmp_path / "ref_in_2")
    run_job(2, args(tmp_path, corpus_file, "ref_in_2", max_iters=15, init_from="resume"))
    # 2 processes x 2 devices, a 2x2 mesh: batch split across the processes (data), parameters and
    # optimizer state split over each process's two devices (fsdp): the same losses as one process
    hybrid = dict(sharding="fsdp", mesh_shape="2x2")
    out, _ = run_job(2, args(tmp_path, corpus_file, "job", cpu_devices=2, tensorboard=True, profile="2:4", **hybrid))
    assert out.count("done: iter 10") == 1  # process 0 alone reports
    # ...and alone writes: each row once, one TensorBoard event file, one trace
    assert [r["iter"] for r in log_rows(tmp_path / "job")] == list(range(10))
    assert len(glob.glob(str(tmp_path / "job" / "tensorboard" / "events.*"))) == 1
    assert len(glob.glob(str(tmp_path / "job" / "profile" / "plugins" / "profile" / "*"))) == 1
    assert_same(losses(tmp_path / "job"), losses(ref), [0, 5, 10])
    # its checkpoint resumes in 1 process, and in 4 x 1, where the fsdp pairs now span processes:
    # the same as 1 -> 2 (which ran plain dp over 2 processes)
    shutil.copytree(tmp_path / "job", tmp_path / "job_in_4")
    in_process(args(tmp_path, corpus_file, "job", max_iters=15, init_from="resume"))
    run_job(4, args(tmp_path, corpus_file, "job_in_4", max_iters=15, init_from="resume", **hybrid))
    for other in ("job", "job_in_4"):
        assert_same(losses(tmp_path / other), losses(tmp_path / "ref_in_2"), [15])


def wait_for(path, predicate, proc, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if os.path.exists(path) and predicate(open(path).read()):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting on {path}")


def test_preemption_and_a_dead_process_lose_nothing(tmp_path, corpus_file):
    long = dict(max_iters=40, lr_decay_iters=40, eval_interval=5)
    run = args(tmp_path, corpus_file, "job", init_from="auto", **long)
    metrics = str(tmp_path / "job" / "metrics.jsonl")
    # SIGTERM to the job (a preempted VM): every process stops at the same step, one checkpoint, exit 0
    p = launch(2, run)
    wait_for(metrics, lambda s: '"iter": 5,' in s, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped at iter")]
    assert len(stopped) == 1 and "checkpoint saved" in stopped[0], out
    stop_iter = int(stopped[0].split()[3].rstrip(";"))
    # the same command again resumes (init_from=auto); then one process dies
    p = launch(2, run)
    wait_for(metrics, lambda s: f'"iter": {stop_iter + 5},' in s, p)
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    t0 = time.monotonic()
    os.kill(int(sorted(children, key=int)[1]), signal.SIGKILL)
    out, err = p.communicate(timeout=120)
    assert time.monotonic() - t0 < 60 and p.returncode != 0
    assert "error: process 1 of 2 was killed by SIGKILL; stopping the other processes" in err
    assert "resuming from" in out or "init_from=auto: resuming" in out + err
    # and once more: it resumes from the newest checkpoint and ends as an uninterrupted run does
    in_process(run)
    ref = in_process(args(tmp_path, corpus_file, "ref", **long))
    got, want = losses(tmp_path / "job"), losses(ref)
    assert max(got) == 40
    assert_same(got, want, [40])
