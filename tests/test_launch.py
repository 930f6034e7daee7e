"""python -m jaxgpt.launch: N processes on this machine form one JAX job, and a job whose
process fails or is signalled ends whole, in bounded time, with one line naming the process."""

import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow  # every test starts a job of local processes

# each process: join the job, then sum a global array whose rows each process made itself
JOB = textwrap.dedent("""
    import os, sys, time
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxgpt import parallel
    parallel.set_cpu_devices(int(sys.argv[1]))
    parallel.maybe_initialize_distributed(timeout_s=60)
    mesh = parallel.make_mesh("dp")
    local = np.arange(2.0 * len(jax.local_devices())) + 100 * jax.process_index()
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P(parallel.AXES)), local)
    total = jax.jit(lambda a: a.sum(), out_shardings=parallel.replicated(mesh))(x)
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    if mode in ("fail", "wait"):  # before the report below: a signal may follow it at once
        import signal
        def on_term(*a):  # what train.py does, minus the checkpoint: leave the job in order
            print(f"process {jax.process_index()} got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, "
          f"sum {float(parallel.host_value(total))}", flush=True)
    if mode == "fail" and jax.process_index() == 1:
        os._exit(3)
    if mode in ("fail", "wait"):
        time.sleep(120)
""")


def launch(tmp_path, nproc, *args, grace=20, **kw):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = subprocess_env(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "jaxgpt.launch", f"--nproc={nproc}", f"--grace={grace}", str(script),
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("nproc, devices", [(2, 2), (4, 1)])
def test_processes_form_one_job(tmp_path, nproc, devices):
    p = launch(tmp_path, nproc, str(devices))
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    n = nproc * devices * 2  # rows 0..2*devices-1 (+100 per process)
    expected = sum(i % (2 * devices) + 100 * (i // (2 * devices)) for i in range(n))
    # the processes share one pipe: a line may arrive in two writes, so find the reports, not lines
    lines = sorted(re.findall(r"process \d+ of \d+: \d+ devices, sum [\d.]+", out))
    assert lines == sorted(f"process {i} of {nproc}: {nproc * devices} devices, sum {float(expected)}"
                           for i in range(nproc))


def test_a_failed_process_ends_the_job_with_one_line(tmp_path):
    p = launch(tmp_path, 2, "1", "fail", grace=2)  # the survivor then waits at JAX's exit barrier: kill it soon
    t0 = time.monotonic()
    out, err = p.communicate(timeout=240)
    assert p.returncode == 3
    assert "error: process 1 of 2 exited with code 3; stopping the other processes" in err
    assert "Traceback" not in err
    assert "process 0 got SIGTERM" in out  # the survivor was told, and did not wait for its 120 s sleep
    assert time.monotonic() - t0 < 100


def test_sigterm_reaches_every_process(tmp_path):
    p = launch(tmp_path, 2, "1", "wait")
    # wait until both processes joined and computed, then preempt the launcher
    seen = []
    while len(seen) < 2:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        seen += re.findall(r"process \d+ of 2:", line)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert sorted(re.findall(r"process \d got SIGTERM", out)) == ["process 0 got SIGTERM", "process 1 got SIGTERM"]


def test_bad_launcher_arguments_get_one_line():
    env = subprocess_env(PYTHONPATH=ROOT)
    for args, msg in [(["--nproc=0", "train.py"], "nproc must be in [1, 4096], got 0"),
                      (["--nproc=2", "nope.py"], "give the script to run")]:
        r = subprocess.run([sys.executable, "-m", "jaxgpt.launch", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and msg in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
