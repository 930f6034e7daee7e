"""Never lose a run: fresh runs never delete one, one trainer per out_dir, signals during saves, a
full or read-only disk, damaged checkpoints for sample / export / resume, kills at random moments.

One tiny run is trained per module and copied for each test; everything runs in-process except
what needs a real second process (a lock holder that is killed, SIGKILL at random moments).
"""

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import export as export_script
import sample as sample_script
import train as train_script
from conftest import ROOT, make_corpus, subprocess_env, tiny_args
from helpers import evaluations
from jaxgpt import rundir
from jaxgpt import trainer as trainer_lib
from jaxgpt.checkpoint import KINDS, Checkpointer, readable
from jaxgpt.config import parse_args
from jaxgpt.errors import UserError
from jaxgpt.loading import load, read_checkpoint
from jaxgpt.trainer import train
from orbax.checkpoint._src.handlers import json_checkpoint_handler


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained tiny run: latest checkpoints at iters 4 and 2, best at one of them."""
    d = tmp_path_factory.mktemp("base")
    (d / "corpus.txt").write_text(make_corpus(), encoding="utf-8")
    train(parse_args(tiny_args(d, str(d / "corpus.txt"), max_iters=4, eval_interval=2)), log=lambda s: None)
    return d


@pytest.fixture
def run(base, tmp_path):
    """A copy of the trained run (out/, data/, corpus.txt) in this test's tmp_path."""
    for name in ("out", "data", "corpus.txt"):
        src = base / name
        shutil.copytree(src, tmp_path / name) if src.is_dir() else shutil.copy(src, tmp_path / name)
    return tmp_path


def args(tmp_path, **kw):
    return tiny_args(tmp_path, str(tmp_path / "corpus.txt"), **kw)


def snapshot(d):
    """Every file and directory under d with its size and modification time."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.stat(p)
            out[os.path.relpath(p, d)] = (st.st_size if n in files else 0, st.st_mtime_ns)
    return out


def one_line(capsys, rc, expected_rc=2):
    err = capsys.readouterr().err
    assert rc == expected_rc, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def all_restore(out_dir):
    """Every listed checkpoint of both kinds reads back whole and finite; returns kind -> steps."""
    steps = {}
    for ckpt, step in readable(out_dir, "latest"):
        _, state, meta, _ = read_checkpoint(ckpt, step)
        assert meta["step"] == step
        assert all(np.isfinite(np.asarray(x)).all() for x in jax_leaves(state.params))
        steps.setdefault(ckpt.kind, []).append(step)
    return steps


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------- runs and directories

@pytest.mark.slow
def test_a_fresh_run_never_deletes_a_run(run, capsys):
    out = str(run / "out")
    before = snapshot(out)
    for init_from in ("scratch", str(run / "out")):  # from scratch, and from weights (here the run itself)
        err = one_line(capsys, train_script.main(args(run, init_from=init_from, max_iters=2)))
        assert err == (f"error: {out} already holds a run (latest checkpoint at iter 4); continue it with "
                       f"--init_from=resume, or pass --overwrite=True to start over and delete it")
    # an evaluation of the run reads it and writes nothing (no config.json, no metrics, no lock)
    assert train_script.main(args(run, init_from="resume", eval_only=True)) == 0
    assert snapshot(out) == before
    # told to: the old run is deleted and a new one starts
    assert train_script.main(args(run, overwrite=True, max_iters=3, eval_interval=3)) == 0
    assert Checkpointer(out, "latest").all_steps() == [3, 0]
    assert [r["iter"] for r in evaluations(out)] == [0, 3]
    assert not os.path.exists(os.path.join(out, rundir.LOCK_NAME))
    # a run that fails before writing anything leaves no out_dir behind (the lock made it)
    one_line(capsys, train_script.main(args(run, init_from="resume", out_dir=str(run / "none"))))
    assert not os.path.exists(run / "none")


@pytest.mark.slow  # processes, signals, kills
def test_one_trainer_per_out_dir_and_a_killed_one_leaves_no_lock(run, capsys):
    out = str(run / "out")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from jaxgpt.rundir import RunLock; "
                               "RunLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(120)", out],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        err = one_line(capsys, train_script.main(args(run, init_from="resume", max_iters=6)))
        assert err.startswith(f"error: {out} is in use by another training process (pid {holder.pid} on host "
                              f"{socket.gethostname()}, since ") and "choose another --out_dir" in err, err
        assert snapshot(out) == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock; its lock file stays behind, stale
        holder.wait()
    assert os.path.exists(os.path.join(out, rundir.LOCK_NAME))
    with rundir.RunLock(out) as lock:
        assert lock.mode == "flock"
    assert not os.path.exists(os.path.join(out, rundir.LOCK_NAME))


@pytest.mark.slow  # processes, signals, kills
def test_the_pid_file_lock_where_flock_is_not_supported(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    pid_file = tmp_path / (rundir.LOCK_NAME + ".pid")
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = socket.gethostname()
    pid_file.write_text(json.dumps({"pid": dead.pid, "host": here}))  # stale: its process died on this host
    with rundir.RunLock(str(tmp_path)) as lock:
        assert lock.mode == "pidfile" and json.loads(pid_file.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"in use by another training process \(pid {os.getpid()} on host "):
            rundir.RunLock(str(tmp_path)).__enter__()
    assert not pid_file.exists()
    pid_file.write_text(json.dumps({"pid": dead.pid, "host": "elsewhere"}))  # another host: cannot tell
    with pytest.raises(UserError, match=f"if that process is gone, delete {pid_file}"):
        rundir.RunLock(str(tmp_path)).__enter__()


# ----------------------------------------------------------------------------- signals

def hold_json_write(monkeypatch, target, during):
    """Orbax's JSON writer, which writes a checkpoint's metadata, runs `during()` (on Orbax's thread)
    before writing the metadata of checkpoint `target` ('latest/2'; 'latest/*': any latest one)."""
    real = json_checkpoint_handler.JsonCheckpointHandler._save_fn
    kind, step = target.split("/")

    async def save_fn(self, x, directory):
        d = str(directory)
        if f"{os.sep}{kind}{os.sep}" in d and (f"{os.sep}{step}.orbax-checkpoint-tmp" in d
                                               or step == "*" and ".orbax-checkpoint-tmp" in d):
            during()
        return await real(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", save_fn)


@pytest.mark.slow  # processes, signals, kills
def test_a_second_sigterm_during_the_save_it_started_waits_for_the_save(run, monkeypatch, capfd):
    """SIGTERM, then SIGTERM again while the checkpoint the first one asked for is being written
    (the write held 0.5 s after the second): the write completes, 'checkpoint saved' is printed only
    once it is on disk, and it is: listed and whole."""
    real_step, sent = trainer_lib.log_step, []

    def first(*a):  # on the main thread, between two steps: (t, cfg, bar, log, clock, mon, it, metrics)
        if a[-2] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*a)

    def second():  # on Orbax's thread, inside the write of the stop's checkpoint
        os.kill(os.getpid(), signal.SIGTERM)
        sent.append(time.time())
        time.sleep(0.5)

    monkeypatch.setattr(trainer_lib, "log_step", first)
    hold_json_write(monkeypatch, "latest/*", second)
    assert train_script.main(args(run, init_from="resume", max_iters=50, eval_interval=1000)) == 0
    out = capfd.readouterr()  # the signal handler writes to file descriptor 2 directly
    assert len(sent) == 1 and "checkpoint saved" in out.out, out
    assert "stopping once the checkpoint being written is complete" in out.err, out.err
    stopped = int(out.out.split("stopped at iter ")[1].split(";")[0])
    assert stopped in (6, 7) and all_restore(str(run / "out"))["latest"] == [stopped, 4]


@pytest.mark.slow
def test_a_second_interrupt_while_a_save_is_in_flight(run, monkeypatch, capsys):
    """Ctrl-C twice (the second one lands while training, checkpoint 6 still being written): the
    write completes first, then one line says where training stopped and what is on disk."""
    hold_json_write(monkeypatch, "latest/6", lambda: time.sleep(1.0))
    real_step = trainer_lib.log_step

    def log_step(*a):  # (t, cfg, bar, log, clock, mon, it, metrics)
        if a[-2] == 6:
            raise KeyboardInterrupt
        return real_step(*a)

    monkeypatch.setattr(trainer_lib, "log_step", log_step)
    rc = train_script.main(args(run, init_from="resume", max_iters=20, eval_interval=6))
    err = one_line(capsys, rc, 130)
    out = str(run / "out")
    assert err == (f"interrupted: training stopped at iter 7; the newest checkpoint is iter 6 in {out}/checkpoints/"
                   f"latest. Continue with --init_from=resume --out_dir={out}")
    assert all_restore(out)["latest"] == [6, 4]


# ----------------------------------------------------------------------------- disks

@pytest.mark.slow
def test_a_disk_that_fills_during_a_save(run, monkeypatch, capsys):
    """The metadata write of checkpoint 6 fails with ENOSPC after its state is written: one line,
    the temporary directory is gone, the earlier checkpoints stay listed and whole, resume works."""
    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    hold_json_write(monkeypatch, "latest/6", full)
    out = str(run / "out")
    err = one_line(capsys, train_script.main(args(run, init_from="resume", max_iters=10, eval_interval=2)))
    assert err.startswith(f"error: cannot write the latest checkpoint at iter 6 to {out}/checkpoints/latest: the disk "
                          f"is full; free some space or choose another --out_dir. The latest checkpoints written "
                          f"before are intact (newest: iter 4)"), err
    assert os.listdir(os.path.join(out, "checkpoints", "latest")) in (["4", "2"], ["2", "4"])
    assert all_restore(out)["latest"] == [4, 2]
    monkeypatch.undo()
    summary = train(parse_args(args(run, init_from="resume", max_iters=6, eval_interval=2)), log=lambda s: None)
    assert summary["iter"] == 6


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1.5 MB tmpfs (room for about three checkpoints of the tiny run), where the test may mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); test_a_disk_that_fills_during_a_save covers a full disk")
    yield mnt
    subprocess.run(["umount", str(mnt)])


@pytest.mark.slow  # processes, signals, kills
def test_a_real_full_disk_and_a_read_only_one(run, small_tmpfs, capsys):
    """TensorStore, which writes Orbax's arrays, reports ENOSPC in its own error type: still one line."""
    out = str(small_tmpfs / "out")
    rc = train_script.main(args(run, out_dir=out, max_iters=30, eval_interval=1))
    err = one_line(capsys, rc)
    assert err.startswith("error: cannot write ") and "the disk is full; free some space" in err, err
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints", "latest")) if "tmp" in n]
    assert all_restore(out)["latest"]  # what was listed before the disk filled reads back whole
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    before = snapshot(out)
    for out_dir in (out, str(small_tmpfs / "new")):  # refused before any training (the config's check of out_dir)
        err = one_line(capsys, train_script.main(args(run, out_dir=out_dir, init_from="resume", max_iters=40)))
        assert err.startswith(f"error: out_dir {out_dir} is not writable"), err
    assert snapshot(out) == before
    # where that check cannot tell (a filesystem that turns read-only later, root squash), the lock file's
    # write is the first one: one line too
    with pytest.raises(UserError, match=f"cannot write the lock file to {out}/.lock: the filesystem is read-only; "
                                        f"choose a writable --out_dir or fix its permissions"):
        rundir.RunLock(out).__enter__()


# ----------------------------------------------------------------------------- damaged checkpoints

def damage(step_dir, how):
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs)
    if how == "truncated":  # every array file cut in half
        for p in files:
            if "ocdbt" in p or f"state{os.sep}d{os.sep}" in p:
                with open(p, "r+b") as f:
                    f.truncate(os.path.getsize(p) // 2)
    elif how == "garbled":  # random bytes over the metadata
        rng = random.Random(0)
        p = os.path.join(step_dir, "meta", "metadata")
        open(p, "wb").write(bytes(rng.randrange(256) for _ in range(os.path.getsize(p))))
    elif how == "missing":  # a piece deleted: the state's tree metadata
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    elif how == "empty":
        shutil.rmtree(step_dir)
        os.mkdir(step_dir)


@pytest.mark.parametrize("how", ["truncated", "garbled", "missing", "empty"])
def test_readers_skip_a_damaged_checkpoint_and_say_which_they_used(run, how):
    out = str(run / "out")
    best = Checkpointer(out, "best").all_steps()[0]
    damage(os.path.join(out, "checkpoints", "best", str(best)), how)
    damage(os.path.join(out, "checkpoints", "latest", "4"), how)
    before = snapshot(out)
    said = []
    *_, meta = load(out, "best", log=said.append)
    assert meta["step"] == 2 and len(said) == 1, said
    assert said[0].startswith(f"warning: skipped unreadable checkpoint(s) in {out}: best iter {best} (")
    assert "; latest iter 4 (" in said[0] and said[0].endswith("using the latest checkpoint at iter 2")
    assert snapshot(out) == before  # readers move and delete nothing


@pytest.mark.slow
def test_sample_export_and_resume_with_damaged_checkpoints(run, capsys):
    out = str(run / "out")
    best = Checkpointer(out, "best").all_steps()[0]
    damage(os.path.join(out, "checkpoints", "best", str(best)), "truncated")
    damage(os.path.join(out, "checkpoints", "latest", "4"), "garbled")
    assert sample_script.main([f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=4"]) == 0
    assert "using the latest checkpoint at iter 2" in capsys.readouterr().err
    assert export_script.main([f"--out_dir={out}", f"--hf_dir={run / 'hf'}"]) == 0
    o = capsys.readouterr()
    assert "using the latest checkpoint at iter 2" in o.err and "(iter 2) to the Hugging Face directory" in o.out
    logs = []
    train(parse_args(args(run, init_from="resume", max_iters=6)), log=logs.append)
    assert any(f"resuming from {out} at iter 2" in line for line in logs), logs
    for kind in KINDS:
        for step in Checkpointer(out, kind).all_steps():
            damage(os.path.join(out, "checkpoints", kind, str(step)), "empty")
    err = one_line(capsys, sample_script.main([f"--out_dir={out}"]))
    assert err.startswith(f"error: no intact checkpoint in {out}: every one is damaged (best iter ") and \
        err.endswith("train again with --overwrite=True, or restore the directory from a copy"), err


def test_resume_falls_back_to_the_best_checkpoint_when_every_latest_one_is_damaged(run):
    """A best checkpoint holds the whole train state too, so it is the newest intact one to resume from."""
    out = str(run / "out")
    best = Checkpointer(out, "best").all_steps()[0]
    for step in Checkpointer(out, "latest").all_steps():
        damage(os.path.join(out, "checkpoints", "latest", str(step)), "garbled")
    logs = []
    summary = train(parse_args(args(run, init_from="resume", max_iters=6)), log=logs.append)
    assert any(line == f"warning: no intact latest checkpoint in {out}; resuming from its best one" for line in logs), logs
    assert any(f"resuming from {out} at iter {best}" in line for line in logs), logs
    assert summary["iter"] == 6 and Checkpointer(out, "latest").all_steps()[0] == 6


# ----------------------------------------------------------------------------- export

def test_export_never_overwrites_unless_told_and_never_leaves_half_a_directory(run, monkeypatch, capsys):
    out, hf = str(run / "out"), run / "hf"
    hf.mkdir()
    (hf / "notes.txt").write_text("mine")
    err = one_line(capsys, export_script.main([f"--out_dir={out}", f"--hf_dir={hf}"]))
    assert err == f"error: {hf} is not empty; export to a new directory, or pass --overwrite=True to replace it"
    err = one_line(capsys, export_script.main([f"--out_dir={out}", f"--hf_dir={hf / 'notes.txt'}"]))
    assert err == f"error: --hf_dir={hf / 'notes.txt'} is a file; pass a directory (it is created if missing)"
    err = one_line(capsys, export_script.main([f"--out_dir={out}", f"--jaxgpt_dir={run}", "--overwrite=True"]))
    assert "holds the run being exported, which --overwrite=True never replaces" in err, err
    # Ctrl-C in the middle of writing: the old directory stays as it was, no partial copy is left
    import safetensors.numpy

    def cut_short(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", cut_short)
    err = one_line(capsys, export_script.main([f"--out_dir={out}", f"--hf_dir={hf}", "--overwrite=True"]), 130)
    assert err == f"interrupted: {hf} was not written (the partial copy was removed)"
    assert os.listdir(hf) == ["notes.txt"] and sorted(os.listdir(run)) == sorted(["out", "data", "corpus.txt", "hf"])
    monkeypatch.undo()
    assert export_script.main([f"--out_dir={out}", f"--hf_dir={hf}", "--overwrite=True"]) == 0
    assert "config.json" in os.listdir(hf) and "notes.txt" not in os.listdir(hf)
    assert sorted(os.listdir(run)) == sorted(["out", "data", "corpus.txt", "hf"])


# ----------------------------------------------------------------------------- kills at random moments

@pytest.mark.slow  # processes, signals, kills
def test_sigkill_at_random_moments_while_checkpointing_every_step(run):
    """Training that writes a checkpoint every step is killed at random moments (seeded), then
    resumed: every listed checkpoint reads back whole each time, and the last resume continues."""
    out, rng = str(run / "out"), random.Random(1234)
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "train.py", *args(run, init_from="resume", max_iters=100000,
                                                                    eval_interval=1)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=subprocess_env(PYTHONUNBUFFERED="1"))
        started = threading.Event()

        def watch():
            for line in proc.stdout:
                if "resuming from" in line:
                    started.set()

        threading.Thread(target=watch, daemon=True).start()
        assert started.wait(120), "training never started"
        time.sleep(rng.uniform(1.0, 2.5))  # resume restores, compiles, then saves every step
        proc.kill()
        proc.wait()
        steps = all_restore(out)
        # (a kill between a checkpoint's commit and the removal of the oldest can leave 3 latest: all whole)
        assert set(steps) == set(KINDS)
    newest = Checkpointer(out, "latest").all_steps()[0]
    summary = train(parse_args(args(run, init_from="resume", max_iters=newest + 2, eval_interval=1)),
                    log=lambda s: None)
    assert summary["iter"] == newest + 2
