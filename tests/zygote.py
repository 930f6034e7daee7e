"""The scripts the tests run, started as forks of a process that has already imported what they
import (jax, flax, optax, orbax, matplotlib, jaxgpt and the scripts' own modules).

A fresh `python train.py ...` spends about 2.5 s of a 2-core CPU importing before it does
anything; the suite starts a few hundred of them. A child forked from this process skips that
and is otherwise the process `python SCRIPT ARGS` would be: its own pid, working directory,
environment, stdin (empty), stdout and stderr (files), exit status, atexit handlers run at the
end. Nothing here starts JAX's backends (the parent holds no device, no thread pool), so each
child starts its own, as a fresh process does.

    python tests/zygote.py        started by helpers.run_python, which writes one request per line:
    {"argv": ["train.py", "--max_iters=2"] | ["-m", "jaxgpt.prepare", ...], "cwd": ..., "env": {...},
     "stdout": FILE, "stderr": FILE}
    and reads back {"pid": PID}, then {"returncode": N} (-SIGNAL when a signal ended it).

What JAX, XLA and matplotlib read from the environment at import time was read here, once; so
helpers.run_python sends a request here only when those variables are the ones this process
started with, and starts a real process otherwise.
"""

import atexit
import json
import os
import runpy
import sys
import traceback

# read at import time by the modules preloaded below: a request must not change them
IMPORT_TIME_ENV = ("JAX_", "XLA_", "TF_", "MPL", "PYTHON", "OMP_", "OPENBLAS_", "MKL_")


def preload():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import numpy  # noqa: F401
    import jax  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    from flax import nnx  # noqa: F401

    import bench  # noqa: F401  (the scripts import the rest of jaxgpt)
    import eval as _eval  # noqa: F401
    import export  # noqa: F401
    import sample  # noqa: F401
    import serve  # noqa: F401
    import train  # noqa: F401
    import jaxgpt.launch  # noqa: F401
    import jaxgpt.prepare  # noqa: F401


def child(req: dict) -> int:
    """Runs the request's script in this (forked) process; returns its exit status."""
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    for target, path in ((1, req["stdout"]), (2, req["stderr"])):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
    argv = req["argv"]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            sys.path[0] = os.getcwd()
            sys.modules.pop(argv[1], None)  # preloaded: run as __main__ afresh, as `python -m` does
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 -- what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:  # noqa: BLE001
                pass
    return code


def serve():
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, jaxgpt
    preload()
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints of this process go to its stderr, never into the replies
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(req)
            finally:
                os._exit(code)
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
