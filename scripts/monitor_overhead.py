"""What watching a run costs: train.py with everything of docs/monitoring.md on (TensorBoard, wandb
offline, a profile) against all of it off, interleaved, on the laptop recipe.

    python scripts/monitor_overhead.py [--reps=3] [--max_iters=500] [--before=DIR] [--input_file=PATH]
    python scripts/monitor_overhead.py --writers     # the TensorBoard writers (and wandb.log) alone
    python scripts/monitor_overhead.py --calls       # one run, the monitor's own calls timed

Each repetition runs every variant once, one after the other (so a busy machine slows them alike):
`off` (metrics.jsonl and loss.png only: they are always written), `on` (--tensorboard=True
--wandb_log=True with WANDB_MODE=offline, --profile=START:STOP of 5 steps mid-run), and with
--before=DIR the same command in another checkout (e.g. the code before this feature). Prints, per
run, ms/iter (the evaluation rows' mean: training steps only, compilation and evaluations left out)
and the wall time of the whole command, then the median, min and max per variant and the medians'
difference from `off`. --writers instead times, each in a fresh process, importing and opening a
TensorBoard writer (tensorboardX's SummaryWriter, tensorboard's own EventFileWriter) and writing
rows of 8 scalars (tensorboardX: one add_scalar each; EventFileWriter: one Event per row, as
jaxgpt.monitor writes them), and wandb.log of such a row (offline). --calls runs train() once in
this process with everything on and times each call of jaxgpt.monitor.Monitor: the rows' share of a
step bounds what watching adds to ms/iter, however busy the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(root: str, flags: list[str], out: str, common: list[str]) -> tuple[float, float]:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": out + "-wandb"}
    os.makedirs(env["WANDB_DIR"], exist_ok=True)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.join(root, "train.py"), *common, f"--out_dir={out}", *flags],
                       cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{root}: train.py failed:\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        evals = [r for r in map(json.loads, f) if r.get("kind", "eval") == "eval"]
    timed = [r["ms_per_iter"] for r in evals if r["ms_per_iter"] == r["ms_per_iter"]]
    return statistics.mean(timed), wall


WRITER = r"""
import os, sys, tempfile, time
which, n = sys.argv[1], 2000
t0 = time.perf_counter()
d = tempfile.mkdtemp()
if which == "tensorboardX":
    from tensorboardX import SummaryWriter
    w = SummaryWriter(d)
    def row(s):
        for k in range(8):
            w.add_scalar(f"train/k{k}", 0.5 * s + k, s)
elif which == "tensorboard":
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    w = EventFileWriter(d)
    def row(s):
        w.add_event(Event(wall_time=time.time(), step=s, summary=Summary(
            value=[Summary.Value(tag=f"train/k{k}", simple_value=0.5 * s + k) for k in range(8)])))
else:
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=d, WANDB_SILENT="true")
    import wandb
    w = wandb.init(project="overhead")
    n = 500
    def row(s):
        w.log({f"train/k{k}": 0.5 * s + k for k in range(8)}, step=s)
opened = time.perf_counter() - t0
t0 = time.perf_counter()
for s in range(n):
    row(s)
per_row = (time.perf_counter() - t0) / n
(w.finish if which == "wandb" else w.close)()
print(f"{which:>13}: import + open {1000 * opened:6.0f} ms, {1e6 * per_row:5.0f} us per row of 8 scalars ({n} rows)")
"""


def writers(reps: int) -> int:
    for rep in range(reps):
        for which in ("tensorboardX", "tensorboard", "wandb"):
            p = subprocess.run([sys.executable, "-c", WRITER, which], capture_output=True, text=True)
            print(f"rep {rep} " + (p.stdout.strip() or f"{which}: not measured ({p.stderr.strip().splitlines()[-1]})"),
                  flush=True)
    return 0


def calls(a, common: list[str]) -> int:
    """One run in this process with everything on, timing the monitor's own calls: an upper bound
    on what it adds (its work may overlap the device's, never more than all of it)."""
    import jaxgpt.monitor as monitor
    from jaxgpt.config import parse_args
    from jaxgpt.trainer import train

    spent: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                spent.setdefault(name, []).append(time.perf_counter() - t0)
        return wrapper

    for name in ("__init__", "train", "eval", "profile", "close"):
        setattr(monitor.Monitor, name, timed(name, getattr(monitor.Monitor, name)))
    half = a.max_iters // 2
    out = tempfile.mkdtemp(prefix="monitor-calls-")
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=out)
    cfg = parse_args(common + [f"--out_dir={out}/run", "--tensorboard=True", "--wandb_log=True",
                               f"--profile={half + 10}:{half + 15}"])
    from jaxgpt.parallel import set_cpu_devices
    set_cpu_devices(cfg.validate().cpu_devices)  # as train.py does, before JAX starts
    train(cfg, log=lambda s: None)
    with open(os.path.join(out, "run", "metrics.jsonl"), encoding="utf-8") as f:
        evals = [r for r in map(json.loads, f) if r["kind"] == "eval" and r["ms_per_iter"] == r["ms_per_iter"]]
    step_ms = statistics.mean(r["ms_per_iter"] for r in evals)
    print(f"one run, everything on: {a.max_iters} steps at {step_ms:.2f} ms/iter (training time)")
    for name, ts in spent.items():
        where = "in the training time" if name == "train" else "outside it"
        print(f"  Monitor.{name:<8} {len(ts):5d} calls, {1000 * sum(ts):8.1f} ms in all, {1000 * max(ts):7.1f} ms the "
              f"longest; {1000 * sum(ts) / a.max_iters:6.3f} ms per step ({where})")
    per_step = 1000 * sum(spent.get("train", [])) / a.max_iters
    print(f"the rows' share of a step: {100 * per_step / step_ms:.2f}%")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max_iters", type=int, default=500)
    ap.add_argument("--before", default="", help="another checkout to run the same command in")
    ap.add_argument("--input_file", default=os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"))
    ap.add_argument("--writers", action="store_true", help="time the writers alone")
    ap.add_argument("--calls", action="store_true", help="time the monitor's calls in one run with everything on")
    a = ap.parse_args()
    if a.writers:
        return writers(a.reps)
    tmp = tempfile.mkdtemp(prefix="monitor-overhead-")
    half = a.max_iters // 2
    common = ["--config", os.path.join(ROOT, "configs", "shakespeare_char_cpu.py"), f"--max_iters={a.max_iters}",
              f"--eval_interval={half}", f"--input_file={os.path.abspath(a.input_file)}",
              f"--data_dir={os.path.join(tmp, 'data')}"]
    if a.calls:
        sys.path.insert(0, ROOT)
        return calls(a, common)
    common.append("--compile_cache=off")
    variants = {"off": (ROOT, []),
                "on": (ROOT, ["--tensorboard=True", "--wandb_log=True", f"--profile={half + 10}:{half + 15}"])}
    if a.before:
        variants = {"before": (os.path.abspath(a.before), []), **variants}
    res = {v: [] for v in variants}
    print(f"train.py {' '.join(common[:4])}; {a.reps} repetitions, interleaved")
    for rep in range(a.reps):
        for name, (root, flags) in variants.items():
            ms, wall = run(root, flags, os.path.join(tmp, f"{name}-{rep}"), common)
            res[name].append((ms, wall))
            print(f"rep {rep} {name:>6}: {ms:7.2f} ms/iter, {wall:6.1f} s wall", flush=True)
    base = statistics.median(ms for ms, _ in res["off"])
    base_wall = statistics.median(w for _, w in res["off"])
    for name, xs in res.items():
        ms, wall = [m for m, _ in xs], [w for _, w in xs]
        print(f"{name:>6}: ms/iter median {statistics.median(ms):.2f} (min {min(ms):.2f}, max {max(ms):.2f}), "
              f"{100 * (statistics.median(ms) / base - 1):+.1f}% vs off; wall median {statistics.median(wall):.1f} s "
              f"(min {min(wall):.1f}, max {max(wall):.1f}), {100 * (statistics.median(wall) / base_wall - 1):+.1f}% vs off")
    print(json.dumps({"results": res, "tmp": tmp}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
