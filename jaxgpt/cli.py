"""The runner every entry point uses: `main = lambda argv: run_cli(body, argv)`.

A UserError becomes one `error: ...` line and exit code 2, Ctrl-C one `interrupted: ...` line and
exit code 130, `--help` (errors.ShowHelp from the flag parser) its text on stdout and exit code 0;
`--debug` shows tracebacks; `--compile_cache=DIR|off` places the compilation cache. Under the
launcher (python -m jaxgpt.launch) the one line goes to the launcher, which says each distinct one once.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from jaxgpt.errors import ShowHelp, UserError
from jaxgpt.runtime import enable_compilation_cache


def run_cli(body, argv: Sequence[str], script_flags: bool = True) -> int:
    """Runs a script's body(argv); a UserError becomes one 'error: ...' line on stderr and exit
    code 2, Ctrl-C (KeyboardInterrupt) one 'interrupted: <what is left>' line and exit code 130.
    `--debug` anywhere in argv shows the full traceback instead.

    Every script gets the persistent compilation cache here, before it compiles anything:
    `--compile_cache=DIR` puts it in DIR, `--compile_cache=off` turns it off (see jaxgpt.runtime).
    script_flags=False (the launcher, whose argv ends with another script's flags): neither is taken."""
    debug = script_flags and "--debug" in argv
    cache = [a for a in argv if a.startswith("--compile_cache=")] if script_flags else []
    try:
        if script_flags:
            enable_compilation_cache(cache[-1].split("=", 1)[1] if cache else "")
            argv = [a for a in argv if a != "--debug" and not a.startswith("--compile_cache=")]
        return body(list(argv))
    except ShowHelp as e:
        try:
            print(e)
        except BrokenPipeError:  # --help | head
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
