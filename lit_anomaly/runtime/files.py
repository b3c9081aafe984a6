"""Atomic files and names that are safe as path components."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class RunError(ValueError):
    """A run folder or output path that cannot be used; the message names it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_atomic(temporary: Path, path: Path) -> None:
    """Give a finished temporary file the user's normal permissions, flush it to disk and move it over `path`:
    a kill or a full disk leaves the previous file or none, never half a file."""
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def temporary_beside(path: Path) -> Path:
    """An empty temporary file in `path`'s folder (created if needed), for `replace_atomic`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    return Path(temporary)


def write_atomic(path: Path, data: str | bytes | Callable[[Path], None]) -> None:
    """Write `data` (or let `data(temporary_path)` write) via a temporary file in the same folder, fsync and
    rename: readers never see half a file."""
    temporary = temporary_beside(path)
    try:
        if callable(data):
            data(temporary)
        else:
            temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    replace_atomic(temporary, path)


def check_output_file(path: str | Path, flag: str, what: str) -> Path:
    """`path` for an output file given by `flag`, refused before any work if it cannot be written there."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise RunError(f"{flag} {path} is a folder; expected a file path for {what}")
    if not path.parent.is_dir():
        raise RunError(f"{flag} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise RunError(f"{flag} {path}: folder {path.parent} is not writable")
    return path


def check_output_folder(path: str | Path, flag: str) -> Path:
    """`path` for an output folder given by `flag` (it may not exist yet), refused before any work where a file
    stands in its way or its nearest existing folder is not writable."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"{flag} {path}: {existing} is a file, not a folder; choose a folder path")
    if not os.access(existing, os.W_OK):
        raise RunError(f"{flag} {path}: folder {existing} is not writable")
    return path


def holds_anything(path: Path) -> bool:
    """`path` is a file, or a folder with anything in it: no place for a fresh output folder."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def to_json(document: Any) -> str:
    return json.dumps(document, indent=2, allow_nan=False, default=str) + "\n"


def sanitize(name: str) -> str:
    """`name` as one path component: a category name from the user never leads outside the run folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
