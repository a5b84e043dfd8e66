"""The one exception type for bad user input, and the one place that turns it into an exit status.

Library code raises `InputError` for anything a user can fix (a missing folder, a malformed file, a bad flag
value); bugs stay tracebacks. Every command runs its body through `report_input_errors`, which prints the
message as a single `error: ...` line on stderr and returns exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """A problem with the user's files or arguments, described in one line."""


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


def report_input_errors(body: Callable[[], object]) -> int:
    """Run a command's body; an InputError becomes one line on stderr and exit status 2.

    The body's return value is the exit status when it is an int, and 0 otherwise.
    """
    try:
        status = body()
    except InputError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0
