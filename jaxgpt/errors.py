"""Mistakes in what the user asked for: one line on stderr, no traceback.

A `UserError` anywhere below a script becomes `error: ...` and exit code 2 in `run_cli`;
`check_choice` is the common case of a value outside its allowed set. This module sits at the
bottom of the package: everything may raise a UserError, and it depends on nothing of ours but
`runtime` (the compilation cache every script turns on before compiling).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from jaxgpt.runtime import enable_compilation_cache


class UserError(Exception):
    """A mistake in what the user asked for; scripts print it as one line, no traceback."""


def run_cli(body, argv: Sequence[str]) -> int:
    """Runs a script's body(argv); a UserError becomes one 'error: ...' line on stderr and exit
    code 2. `--debug` anywhere in argv shows the full traceback instead.

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
        print(f"error: {e}", file=sys.stderr)
        return 2


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
