"""Mistakes in what the user asked for: a `UserError` anywhere below a script becomes one line on
stderr, no traceback (jaxgpt.cli.run_cli); `check_choice` is the common case of a value outside
its allowed set. This module sits at the bottom of the package and depends on nothing.
"""

from __future__ import annotations

from typing import Any, Sequence


class UserError(Exception):
    """A mistake in what the user asked for; scripts print it as one line, no traceback."""


class ShowHelp(Exception):
    """--help: the script prints this text on stdout and exits 0 (raised by the flag parser)."""


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
