"""What `lit-anomaly predict` and `lit-anomaly-infer` read and write: the input images of a folder, one JSON line
per image, and anomaly maps in MVTec AD 2's submission layout. Both engines write through here, so a line can
switch between them without changing what reads its results."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .decision import flagged
from .files import sanitize, write_atomic
from .image import resize_map

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_hidden(path: Path) -> bool:
    """A dot name: never data. Copies from a Mac to FAT or network drives leave a `._NAME.png` beside every
    image (AppleDouble metadata, not a PNG), and Jupyter leaves `.ipynb_checkpoints/` folders of copies."""
    return path.name.startswith(".")


def images_below(folder: Path) -> list[Path]:
    """Every image file below `folder` (recursively), sorted, none that is hidden or lies in a hidden folder."""

    def hidden(path: Path) -> bool:
        relative = path.relative_to(folder)
        return any(is_hidden(part) for part in (relative, *relative.parents))

    return [
        p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not hidden(p)
    ]


def output_names(paths: Sequence[str | Path]) -> dict[str, Path]:
    """A unique relative name (no suffix) per input path, for its map files: the path below the inputs'
    common folder, so `a.png` and `sub/a.png` stay apart; files differing only in suffix (`b.png`,
    `b.jpg`) keep it (`b.png`, `b.jpg`). Every part is sanitised, so no name leads outside the output folder."""
    paths = [Path(p) for p in paths]
    if not paths:
        return {}
    root = Path(os.path.commonpath([p.parent for p in paths]))
    stems = [p.relative_to(root).with_suffix("") for p in paths]
    taken: dict[Path, int] = {}
    for stem in stems:
        taken[stem] = taken.get(stem, 0) + 1
    names = {}
    for path, stem in zip(paths, stems, strict=True):
        relative = path.relative_to(root) if taken[stem] > 1 else stem
        names[str(path)] = Path(*(sanitize(part) for part in relative.parts))
    return names


def prediction_line(
    index: int, path: str, category: str, score: float | None, threshold: float | None, error: str | None = None
) -> dict[str, Any]:
    """One line of predictions.jsonl: a scored image, or an unreadable one with its `error` and no score."""
    line = {
        "index": index, "path": path, "category": category, "score": score, "threshold": threshold,
        "pred": int(flagged(score, threshold)) if score is not None and threshold is not None else None,
    }  # fmt: skip
    if error is not None:
        line["error"] = error
    return line


def write_map_files(
    output_dir: Path, name: Path, category: str, split: str, anomaly_map: np.ndarray, threshold: float | None
) -> None:
    """anomaly_images/<category>/<split>/<name>.tiff (the float32 map, already at the image's own size) and,
    with a threshold, anomaly_images_thresholded/.../<name>.png (0/255)."""
    relative = Path(category, split, name.parent)
    maps = Image.fromarray(anomaly_map.astype(np.float32), mode="F")
    write_atomic(output_dir / "anomaly_images" / relative / f"{name.name}.tiff", partial(maps.save, format="TIFF"))
    if threshold is not None:
        binary = Image.fromarray((flagged(anomaly_map, threshold) * 255).astype(np.uint8))
        path = output_dir / "anomaly_images_thresholded" / relative / f"{name.name}.png"
        write_atomic(path, partial(binary.save, format="PNG", compress_level=1))  # a fast zlib level for the line


def map_at_image_size(anomaly_map: np.ndarray, shown_size: tuple[int, int]) -> np.ndarray:
    """A map at the fitted size, resized to the image's (W, H) as a viewer shows it."""
    width, height = shown_size
    return resize_map(anomaly_map, (height, width))
