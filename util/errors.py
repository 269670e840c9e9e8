"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad flag, a missing data
file, a corrupted checkpoint).  The command-line entry points catch it, print
``error: <message>`` on one line to stderr and exit with status 2, without a
traceback.  Messages should say what to do next.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A user mistake; the CLI prints ``error: <message>`` and exits 2."""


def one_line(text: object) -> str:
    """Collapse ``text`` to a single line (for error messages)."""
    return " ".join(str(text).split())


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run an entry point: a ``UserError`` becomes one ``error:`` line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; completed epochs are saved, continue with --resume", file=sys.stderr)
        return 130
    return 0
