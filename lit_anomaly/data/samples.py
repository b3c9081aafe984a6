"""Samples and file listing: what a dataset family returns, and how folders become samples."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..runtime.outputs import IMAGE_EXTENSIONS, images_below, is_hidden

__all__ = ["IMAGE_EXTENSIONS", "SPLITS", "DatasetError", "Sample", "images_below", "is_hidden"]
SPLITS = ("train", "calibration", "test", "predict")


class DatasetError(ValueError):
    """Bad dataset input; the message names the path or value and what was expected."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous, -1 unknown
    defect_type: str
    masks: tuple[Path, ...] = ()  # several masks (MVTec LOCO) are OR-ed together


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, any supported extension in any case, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p)
    )


def subfolders(folder: Path) -> list[Path]:
    """The folders directly inside `folder`, sorted by name, hidden ones left out."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p)) if folder.is_dir() else []


def find_mask(folder: Path, stem: str, suffixes: Sequence[str] = ("_mask", "")) -> Path | None:
    """The mask file for image `stem` in `folder`: `<stem><suffix>.<any image ext>`, first suffix wins."""
    for suffix in suffixes:
        for ext in IMAGE_EXTENSIONS:
            for candidate in (folder / f"{stem}{suffix}{ext}", folder / f"{stem}{suffix}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def labelled_folder(folder: Path, label: int, defect_type: str, mask_dir: Path | None = None) -> list[Sample]:
    """Every image of one folder as samples; masks are looked up in `mask_dir` when given."""
    samples = []
    for path in list_images(folder):
        mask = find_mask(mask_dir, path.stem) if mask_dir is not None else None
        samples.append(Sample(path, label, defect_type, (mask,) if mask else ()))
    return samples


def limit_test_samples(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """A seeded subset of `limit` samples that keeps normal and anomalous images in proportion (one each at least)."""
    if limit >= len(samples):
        return samples
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for position, sample in enumerate(samples):
        groups.setdefault(sample.label, []).append(position)
    quotas = {label: max(1, round(limit * len(members) / len(samples))) for label, members in groups.items()}
    while sum(quotas.values()) > limit:  # rounding overshoot: trim the largest group
        largest = max(quotas, key=lambda label: quotas[label])
        quotas[largest] -= 1
    chosen = []
    for label, members in groups.items():
        chosen += rng.sample(members, min(quotas[label], len(members)))
    return [samples[i] for i in sorted(chosen)]
