"""Start one job as several processes on this machine: the local stand-in for a multi-node run.

    python -m jaxgpt.launch --nproc=4 train.py --config configs/shakespeare_char_cpu.py --cpu_devices=1
    python -m jaxgpt.launch --nproc=2 bench.py --n_layer=2 --steps=5

Each process runs the same command with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set; jaxgpt.parallel.maybe_initialize_distributed() reads them and joins the
job, as it joins a SLURM, Open MPI or Cloud TPU job from their own variables. Process 0 hosts
the coordinator.

The launcher keeps the job whole: when a process exits with an error (or is killed), it says
why in one line (the process's own `error: ...` line, each distinct one once, not once per process;
else which process failed and how), and ends the others (SIGTERM, then SIGKILL after --grace seconds), so no
process waits for ever on a peer that is gone. SIGINT / SIGTERM to the launcher reach every
process, which save one consistent checkpoint and exit (what a preempted VM does).
"""

from __future__ import annotations

import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from jaxgpt.cli import ERROR_DIR_ENV, run_cli
from jaxgpt.config import group, parse_args, rng, validate_fields
from jaxgpt.errors import UserError

# the variables a jaxgpt process reads to join a job (besides the launchers' own, see parallel.py)
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch(command: list[str], nproc: int, port: int = 0, grace: float = 15.0, env: dict | None = None,
           log=lambda s: print(s, file=sys.stderr, flush=True)) -> int:
    """Runs `command` (a script and its arguments, run with this Python) as nproc processes of one
    job and returns the job's exit code: 0 when all succeed, else the first failure's."""
    base = dict(os.environ if env is None else env)
    errors = tempfile.mkdtemp(prefix="jaxgpt-launch-")  # each process's one-line error, if it has one
    base.update({ENV_COORDINATOR: f"127.0.0.1:{port or free_port()}", ENV_NUM_PROCESSES: str(nproc),
                 ERROR_DIR_ENV: errors,
                 "XLA_PYTHON_CLIENT_PREALLOCATE": base.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")})
    procs = [subprocess.Popen([sys.executable, *command], env={**base, ENV_PROCESS_ID: str(i)})
             for i in range(nproc)]
    stopping: list[float] = []  # when the others were asked to stop

    def forward(signum, frame):  # preemption or Ctrl-C: every process checkpoints and exits
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failure = 0
    said: set[str] = set()

    def their_line(i: int) -> str | None:
        """Process i's own one-line error (or interruption), said once per job."""
        try:
            with open(os.path.join(errors, str(i)), encoding="utf-8") as f:
                line = f.read().strip()
        except OSError:
            return None
        if not line or line in said:
            return "" if line else None
        said.add(line)
        return line

    def check():
        nonlocal failure
        # a process killed by a signal is named before one that failed in the same instant: the
        # others often fail only because their peer vanished (a reset connection)
        order = sorted(range(nproc), key=lambda i: (procs[i].poll() or 0) >= 0)
        for i in order:
            p = procs[i]
            code = p.poll()
            if code not in (None, 0) and not failure:
                failure = code if code > 0 else 128 - code
                running = [q for q in procs if q.poll() is None]
                own = their_line(i)
                if own:
                    log(own)
                elif own is None:
                    log(f"error: process {i} of {nproc} {describe(code)}"
                        + ("; stopping the other processes" if running else ""))
                for q in running:
                    q.terminate()
                stopping.append(time.monotonic())

    try:
        while any(p.poll() is None for p in procs):
            check()
            if stopping and time.monotonic() - stopping[0] > grace:
                for q in procs:
                    if q.poll() is None:
                        q.kill()
            time.sleep(0.05)
        check()
        for i in range(nproc):  # what else the processes had to say (an interruption, another error)
            own = their_line(i)
            if own:
                log(own)
    finally:
        shutil.rmtree(errors, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return failure


_launch = group("launch")


@dataclass(frozen=True)
class LaunchConfig:
    """Starts one job as several processes on this machine (the local stand-in for a multi-node run): the script
    and its flags follow the launcher's own flags."""

    nproc: int = _launch(0, rng(1, 4096), "processes in the job")
    port: int = _launch(0, rng(0, 65535), "the coordinator's port on 127.0.0.1 (0 = a free one)")
    grace: float = _launch(15.0, rng(0), "seconds the other processes get to exit after one failed, before they are killed")


def main(argv=None) -> int:
    def body(args):
        a, command = parse_args(args, LaunchConfig, prog="python -m jaxgpt.launch", rest=True)
        validate_fields(a)
        if not command or not os.path.isfile(command[0]):
            raise UserError("give the script to run after the flags, e.g. python -m jaxgpt.launch --nproc=2 "
                            "train.py --config configs/shakespeare_char_cpu.py")
        return launch(command, a.nproc, a.port, a.grace)

    return run_cli(body, sys.argv[1:] if argv is None else list(argv), script_flags=False)


if __name__ == "__main__":
    sys.exit(main())
