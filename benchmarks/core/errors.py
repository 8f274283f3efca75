"""User-facing errors and the command-line wrapper that turns them into one-line exits.

Every check on user input raises :class:`UsageError` with a message that names the bad
value and says how to fix it. Entry points run through :func:`run_cli`, which prints
``error: <message>`` to stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence


class UsageError(ValueError):
    """Bad input from the user: an argument, a path, a data source or a config value."""


class DataError(UsageError):
    """A data source lacks a file, a split or a field, or holds a malformed record."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the run stops and keeps what it already measured
    (``report``: where that was written, if anywhere)."""

    def __init__(self, message: str, report=None) -> None:
        super().__init__(message)
        self.report = report


def setup_logging(verbose: bool = False) -> None:
    """Route library ``logging`` to stderr with a short format (entry points only)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run an entry point; a :class:`UsageError` becomes one line on stderr and exit 2."""
    try:
        code = main(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
