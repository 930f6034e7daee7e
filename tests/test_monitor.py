"""Watching a run: metrics.jsonl's rows per log step, TensorBoard events read back with
TensorBoard's own reader, a resumed run's curves without repeated steps, loss.png at every
evaluation, --profile traces (train.py and bench.py), and nanoGPT's wandb keys."""

import glob
import json
import math
import os
import shutil
import sys

import pytest

import bench as bench_script
import train as train_script
from conftest import tiny_args
from helpers import evaluations, log_rows
from jaxgpt.config import parse_args
from jaxgpt.optim import lr_schedule
from jaxgpt.trainer import train

TRAIN_KEYS = ["kind", "iter", "loss", "lr", "grad_norm", "ms_per_iter", "tokens_per_s", "mfu", "skipped_steps"]
EVAL_KEYS = ["kind", "iter", "train_loss", "val_loss", "lr", "ms_per_iter", "tokens_per_s", "mfu", "best_val_loss",
             "skipped_steps"]


def rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tensorboard_scalars(out_dir):
    """{tag: [(step, value), ...]} as TensorBoard shows them (its EventAccumulator, which applies a
    restart marker's purge as the TensorBoard server does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out_dir, "tensorboard"), size_guidance={"scalars": 0})  # 0: keep all
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tensorboard_equals_metrics(out_dir):
    """Every measured figure of every metrics.jsonl row is TensorBoard's scalar <kind>/<key> at step
    iter (float32: relative 1e-6), and TensorBoard has nothing else: no step twice in a curve."""
    tb = tensorboard_scalars(out_dir)
    want = {}
    for r in rows(out_dir):
        for k, v in r.items():
            if k not in ("kind", "iter") and math.isfinite(v):
                want.setdefault(f"{r['kind']}/{k}", []).append((r["iter"], v))
    assert sorted(tb) == sorted(want)
    for tag, points in want.items():
        steps = [s for s, _ in tb[tag]]
        assert steps == [s for s, _ in points], tag
        assert len(set(steps)) == len(steps), f"{tag}: a step repeated"
        for (s, got), (_, v) in zip(tb[tag], points):
            assert got == pytest.approx(v, rel=1e-6, abs=1e-30), f"{tag} at {s}"


@pytest.mark.slow  # three short runs in-process
def test_log_rows_tensorboard_and_a_resumed_run_continue_the_same_curves(tmp_path, corpus_file):
    """A row per log step (read when the run says it logged: flushed), both optimizers' learning
    rates with Muon, the same figures in TensorBoard; killed after a checkpoint and resumed, neither
    metrics.jsonl nor TensorBoard repeats a step."""
    seen = []

    def log(line):  # a log line is written after its row: the row is on disk already (tail -f)
        if line.startswith("iter ") and ": loss " in line:
            seen.append((int(line.split()[1].rstrip(":")), log_rows(tmp_path / "out")[-1]["iter"]))

    kw = dict(max_iters=8, eval_interval=5, log_interval=1, tensorboard=True, optimizer="muon")
    cfg = parse_args(tiny_args(tmp_path, corpus_file, **kw))
    train(cfg, log=log)
    assert seen and all(a == b for a, b in seen), seen
    out = cfg.out_dir
    train_rows, evals = log_rows(out), evaluations(out)
    assert [r["iter"] for r in train_rows] == list(range(8)) and [r["iter"] for r in evals] == [0, 5, 8]
    assert [list(r) for r in train_rows] == [TRAIN_KEYS[:4] + ["lr_muon"] + TRAIN_KEYS[4:]] * 8
    assert [list(r) for r in evals] == [EVAL_KEYS[:5] + ["lr_muon"] + EVAL_KEYS[5:]] * 3
    adamw, muon = lr_schedule(cfg), lr_schedule(cfg, cfg.muon_lr)
    for r in train_rows:
        assert r["lr"] == pytest.approx(float(adamw(r["iter"])), rel=1e-6)
        assert r["lr_muon"] == pytest.approx(float(muon(r["iter"])), rel=1e-6)
        assert r["grad_norm"] > 0 and r["skipped_steps"] == 0 and math.isfinite(r["loss"])
    # step 0 compiles (not timed); every later row is timed, and its figures agree with each other
    assert math.isnan(train_rows[0]["ms_per_iter"])
    for r in train_rows[1:]:
        assert r["ms_per_iter"] > 0
        assert r["tokens_per_s"] == pytest.approx(4 * 16 / r["ms_per_iter"] * 1000, rel=1e-9)
        assert r["mfu"] > 0
    assert_tensorboard_equals_metrics(out)

    # killed after iter 5's checkpoint was written (its step 8 one never was) while writing a row:
    # resumed to 10
    shutil.rmtree(os.path.join(out, "checkpoints", "latest", "8"))
    before = {r["iter"]: r for r in log_rows(out)}
    with open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "iter": 8, "lo')
    train(parse_args(tiny_args(tmp_path, corpus_file, **{**kw, "max_iters": 10, "init_from": "resume"})),
          log=lambda s: None)
    train_rows, evals = log_rows(out), evaluations(out)
    assert [r["iter"] for r in train_rows] == list(range(10)) and [r["iter"] for r in evals] == [0, 5, 10]
    after = {r["iter"]: r for r in train_rows}
    assert all(after[i] == before[i] for i in range(5))  # kept as they were
    assert all(after[i]["loss"] == before[i]["loss"] for i in range(5, 8))  # done again, the same steps
    assert len(glob.glob(os.path.join(out, "tensorboard", "events.*"))) == 2
    assert_tensorboard_equals_metrics(out)


@pytest.mark.slow  # runs in-process, a trace written twice
def test_profile_writes_a_trace_of_the_steps_asked(tmp_path, corpus_file, capsys):
    """--profile=1:4 on a 5-step run leaves an .xplane.pb (TensorBoard's profile plugin) and a
    perfetto_trace.json.gz; bench.py takes the same flag."""
    logged = []
    cfg = parse_args(tiny_args(tmp_path, corpus_file, max_iters=5, eval_interval=5, profile="1:4"))
    train(cfg, log=logged.append)
    runs = glob.glob(os.path.join(cfg.out_dir, "profile", "plugins", "profile", "*"))
    assert len(runs) == 1
    assert glob.glob(os.path.join(runs[0], "*.xplane.pb")) and os.path.exists(os.path.join(runs[0], "perfetto_trace.json.gz"))
    assert [s for s in logged if s.startswith("profile:")] == [
        f"profile: steps 1 to 3 traced in {cfg.out_dir}/profile (tensorboard --logdir {cfg.out_dir}/profile, or "
        f"perfetto_trace.json.gz at ui.perfetto.dev)"]
    # a range the run never reaches says so, and writes nothing
    logged.clear()
    cfg = parse_args(tiny_args(tmp_path / "b", corpus_file, max_iters=2, eval_interval=2, profile="5:6"))
    train(cfg, log=logged.append)
    assert "profile: the run ended before step 5; no trace written" in logged
    assert not os.path.exists(os.path.join(cfg.out_dir, "profile"))

    out = tmp_path / "bench"
    assert bench_script.main(["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
                              "--steps=3", "--profile=2:4", f"--out_dir={out}"]) == 0
    assert len(glob.glob(str(out / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))) == 1
    assert "profile: steps 2 to 3 traced" in capsys.readouterr().out


def wandb_history(path):
    """{step: {key: value}} of a wandb run file (.wandb: wandb's record log, LevelDB's log format of
    32 KiB blocks holding protobuf Records; wandb has no Python reader of it since 0.2x)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:4]
    pos, block, part, out = 7, 32768, b"", {}  # a 7-byte file header; a 7-byte header per record
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            r = pb.Record()
            r.ParseFromString(part)
            part = b""
            if r.WhichOneof("record_type") == "history":
                out.setdefault(r.history.step.num, {}).update(
                    {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return out


NANOGPT_CONFIG = """# a nanoGPT config file: wandb's keys as nanoGPT's train_shakespeare_char.py sets them
wandb_log = True
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'
"""


@pytest.mark.slow  # wandb starts a service process of its own
def test_a_nanogpt_config_with_wandb_log_trains_offline(tmp_path, corpus_file, monkeypatch):
    """wandb_log = True in a nanoGPT config: with WANDB_MODE=offline the run is logged with no
    network (wandb's run file holds every figure of metrics.jsonl at its step)."""
    wandb = pytest.importorskip("wandb")  # in the test extra
    (tmp_path / "nano.py").write_text(NANOGPT_CONFIG, encoding="utf-8")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = ["--config", str(tmp_path / "nano.py"),
            *tiny_args(tmp_path, corpus_file, max_iters=4, eval_interval=4, log_interval=1)]
    assert train_script.main(argv) == 0
    runs = glob.glob(str(tmp_path / "wandb-dir" / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    # what wandb recorded, read back from its run file: every metrics.jsonl figure at its step
    want = {}
    for r in rows(tmp_path / "out"):
        want.setdefault(r["iter"], {}).update({f"{r['kind']}/{k}": v for k, v in r.items()
                                               if k not in ("kind", "iter") and math.isfinite(v)})
    history = wandb_history(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0])
    assert {step: {k: v for k, v in h.items() if not k.startswith("_")} for step, h in history.items()} == want
    assert wandb.run is None  # finished


def test_a_nanogpt_config_with_wandb_log_trains_without_wandb(tmp_path, corpus_file, monkeypatch):
    """wandb not installed: one line says how to install it, and training goes on."""
    (tmp_path / "nano.py").write_text(NANOGPT_CONFIG, encoding="utf-8")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    lines = []
    train(parse_args(["--config", str(tmp_path / "nano.py"),
                      *tiny_args(tmp_path, corpus_file, max_iters=2, eval_interval=2)]), log=lines.append)
    assert [s for s in lines if "wandb" in s and "warning" in s] == [
        "warning: wandb_log=True needs the wandb package: pip install wandb (or pip install -e '.[monitor]'); "
        "training goes on without wandb"]
    assert [r["iter"] for r in evaluations(tmp_path / "out")] == [0, 2]
    assert not os.path.exists(tmp_path / "out" / "wandb")


@pytest.mark.slow
def test_without_tensorboard_installed_one_line_and_training_goes_on(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    lines = []
    train(parse_args(tiny_args(tmp_path, corpus_file, max_iters=2, eval_interval=2, tensorboard=True)),
          log=lines.append)
    assert [s for s in lines if "tensorboard" in s.lower() and "warning" in s] == [
        "warning: tensorboard=True needs the tensorboard package: pip install tensorboard (or pip install -e "
        "'.[monitor]'); training goes on without TensorBoard events"]
    assert [r["iter"] for r in evaluations(tmp_path / "out")] == [0, 2]
    assert not os.path.exists(tmp_path / "out" / "tensorboard")


@pytest.mark.slow
def test_loss_png_is_drawn_at_every_evaluation_and_a_failed_plot_is_said_once(tmp_path, corpus_file, monkeypatch):
    """loss.png exists after the first evaluation (not only at the end); when drawing fails the
    run goes on, says so once, and its metrics are whole."""
    import jaxgpt.monitor as monitor

    drawn = []
    real = monitor.plot_losses

    def plot(metrics_path, png):
        real(metrics_path, png)
        drawn.append(len(evaluations(os.path.dirname(png))))

    monkeypatch.setattr(monitor, "plot_losses", plot)
    train(parse_args(tiny_args(tmp_path, corpus_file, max_iters=4, eval_interval=2)), log=lambda s: None)
    assert drawn == [1, 2, 3] and os.path.getsize(tmp_path / "out" / "loss.png") > 1000

    def broken(metrics_path, png):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(monitor, "plot_losses", broken)
    lines = []
    train(parse_args(tiny_args(tmp_path / "b", corpus_file, max_iters=4, eval_interval=2)), log=lines.append)
    assert [s for s in lines if s.startswith("warning: cannot draw")] == [
        f"warning: cannot draw {tmp_path / 'b' / 'out' / 'loss.png'} (RuntimeError: no fonts); training goes on, "
        f"metrics.jsonl has the figures"]
    assert [r["iter"] for r in evaluations(tmp_path / "b" / "out")] == [0, 2, 4]
