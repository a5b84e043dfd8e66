"""The one exception type for bad user input, and the one place that turns it into an exit status.

Library code raises `InputError` for anything a user can fix (a missing folder, a malformed file, a bad flag
value); bugs stay tracebacks. Every command runs its body through `report_input_errors`, which prints the
message as a single `error: ...` line on stderr and returns exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from numbers import Integral
from pathlib import Path


class InputError(ValueError):
    """A problem with the user's files or arguments, described in one line."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: Exception) -> str:
    """The error's message on one line.

    A DataLoader worker's exception is re-raised in the main process as the same type, but with the
    worker's whole traceback as its message; the original message is on its last line.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        prefix, _, message = lines[-1].partition(": ")
        return message if prefix.endswith("InputError") else lines[-1]
    return " ".join(lines)


def no_file_reason(path) -> str:
    """Why a path that should name a file does not: "no such file", or that it is a folder."""
    return "a folder, not a file" if Path(path).is_dir() else "no such file"


def require_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int when it is an integer (not a bool) of at least ``minimum``; else an InputError."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def report_input_errors(body: Callable[[], object]) -> int:
    """Run a command's body; an InputError, or an OSError about a named path (an output folder that cannot be
    created, a file where a folder should be, a full disk), becomes one line on stderr and exit status 2; a
    Ctrl-C that the body did not handle itself, a line and status 130 (`user_error`).

    The body's return value is the exit status when it is an int, and 0 otherwise.
    """
    try:
        status = body()
    except (InputError, OSError, KeyboardInterrupt) as error:
        known = user_error(error)
        if known is None:
            raise
        status, message = known
        print("interrupted" if isinstance(error, KeyboardInterrupt) else f"error: {message}", file=sys.stderr)
        return status
    return status if isinstance(status, int) else 0


def user_error(error: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) of an error the user can act on: bad input or a path (2), a Ctrl-C
    (130); None for anything else (a bug, worth its traceback)."""
    if isinstance(error, InputError):
        return 2, one_line(error)
    if isinstance(error, OSError) and error.filename is not None:
        return 2, path_error(error)
    if isinstance(error, KeyboardInterrupt):
        return 130, "interrupted"
    return None


def path_error(error: OSError) -> str:
    """``path: reason`` for an OSError about a path (of a failed rename, the destination: the user's path)."""
    path = error.filename2 if error.filename2 is not None else error.filename
    return f"{path}: {error.strerror or type(error).__name__}"
