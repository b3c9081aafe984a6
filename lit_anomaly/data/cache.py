"""An opt-in cache of decoded, resized images and masks: a second detector on the same data decodes nothing."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np

from ..runtime.files import write_atomic

CACHE_VERSION = 2  # bump when decoding or resizing changes


class DecodeCache:
    """Resized (image, mask) arrays under `folder`, keyed by every file's resolved path, byte size and
    modification time and by the target size: a changed file or another image_size misses, never hits stale."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)  # OSError here: the caller names its flag

    def _entry(self, files: tuple[Path, ...], size: tuple[int, int]) -> Path:
        parts: list[object] = [CACHE_VERSION, tuple(size)]
        for path in files:
            stat = path.stat()
            parts += [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
        digest = hashlib.sha256(repr(parts).encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.npz"

    def load(self, files: tuple[Path, ...], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            with np.load(self._entry(files, size)) as stored:
                return stored["image"], stored["mask"]
        except (OSError, ValueError, KeyError):  # a miss, or an unreadable entry: decode again
            return None

    def store(self, files: tuple[Path, ...], size: tuple[int, int], image: np.ndarray, mask: np.ndarray) -> None:
        def save(path: Path) -> None:
            with open(path, "wb") as stream:
                np.savez(stream, image=image, mask=mask)

        with contextlib.suppress(OSError):  # a full disk costs the cache an entry, never the run
            write_atomic(self._entry(files, size), save)
