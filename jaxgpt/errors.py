"""Mistakes in what the user asked for: one line on stderr, no traceback.

A `UserError` anywhere below a script becomes `error: ...` and exit code 2 in `run_cli`, and
Ctrl-C `interrupted: ...` and exit code 130 (a KeyboardInterrupt's message says what state is left);
`check_choice` is the common case of a value outside its allowed set. This module sits at the
bottom of the package: everything may raise a UserError, and it depends on nothing of ours but
`runtime` (the compilation cache every script turns on before compiling).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from jaxgpt.runtime import enable_compilation_cache


class UserError(Exception):
    """A mistake in what the user asked for; scripts print it as one line, no traceback."""


def run_cli(body, argv: Sequence[str]) -> int:
    """Runs a script's body(argv); a UserError becomes one 'error: ...' line on stderr and exit
    code 2, Ctrl-C (KeyboardInterrupt) one 'interrupted: <what is left>' line and exit code 130.
    `--debug` anywhere in argv shows the full traceback instead.

    Every script gets the persistent compilation cache here, before it compiles anything:
    `--compile_cache=DIR` puts it in DIR, `--compile_cache=off` turns it off (see jaxgpt.runtime)."""
    debug = "--debug" in argv
    cache = [a for a in argv if a.startswith("--compile_cache=")]
    try:
        enable_compilation_cache(cache[-1].split("=", 1)[1] if cache else "")
        return body([a for a in argv if a != "--debug" and not a.startswith("--compile_cache=")])
    except UserError as e:
        if debug:
            raise
        report(f"error: {e}")
        _leave_job(2)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line saying what is left, exit code 130 (128 + SIGINT)
        if debug:
            raise
        report(f"interrupted{f': {e}' if str(e) else ''}")
        _leave_job(130)
        return 130
    except Exception:
        _leave_job(1, traceback=True)
        raise


# set by python -m jaxgpt.launch: a directory where each process leaves its one-line error instead of
# printing it, so the launcher prints each distinct line once, not once per process
ERROR_DIR_ENV = "JAXGPT_ERROR_DIR"


def report(line: str) -> None:
    """The one line a script ends with: on stderr, or (under the launcher) handed to the launcher."""
    where = os.environ.get(ERROR_DIR_ENV)
    if where and os.path.isdir(where):
        try:
            with open(os.path.join(where, os.environ.get("JAX_PROCESS_ID", "0")), "w", encoding="utf-8") as f:
                f.write(line)
            return
        except OSError:
            pass
    print(line, file=sys.stderr)


def _leave_job(code: int, traceback: bool = False) -> None:
    """In a job of several processes, a process that fails exits at once: JAX's exit handler
    would otherwise wait at a barrier for the others, which wait for it in their next collective,
    so the job would hang instead of ending (the launcher then ends the others)."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized() or jax.process_count() == 1:
        return
    if traceback:
        import traceback as tb

        tb.print_exc()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
