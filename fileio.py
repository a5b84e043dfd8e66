"""Atomic file writes: every file this repository writes goes through `atomic_write`; and the one check that
a command does not replace earlier results unasked (`refuse_to_replace`).

The content goes to a temporary file in the target's own folder (same file system), which then replaces the
target with ``os.replace``. A crash or a kill never leaves half a file behind, and a reader never sees one.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from errors import InputError


def refuse_to_replace(path, overwrite: bool, flag: str = "") -> None:
    """An InputError when ``path`` exists and ``--overwrite`` was not given: earlier results are never replaced
    unasked. ``flag`` (e.g. ``--output``) leads the message when given."""
    if Path(path).is_dir():  # --overwrite could not help: a folder is not replaced by a file
        raise InputError(f"{flag + ' ' if flag else ''}{path} is a folder; name a file")
    if Path(path).exists() and not overwrite:
        raise InputError(f"{flag + ' ' if flag else ''}{path} exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", **open_kwargs) -> Iterator[IO[Any]]:
    """``with atomic_write(path, "w") as handle: ...``; the target appears whole when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name opened with "x" (not mkstemp, whose 0600 mode would outlive the rename): the
    # file gets the user's usual permissions
    temporary = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temporary, mode.replace("w", "x"), **open_kwargs) as handle:
            yield handle
            # on disk before the rename: after a power cut or a node crash the name holds the old file or the
            # whole new one, never an empty one whose data was still in the page cache
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        # after a successful replace the temporary name no longer exists
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def write_json_atomic(data, path, indent: int = 2) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=indent)
        handle.write("\n")


def save_torch_atomic(state, path) -> None:
    """``torch.save`` through `atomic_write`: a kill during a save never leaves half a checkpoint."""
    import torch  # the other writers here do not need torch

    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
