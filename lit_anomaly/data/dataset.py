"""The Dataset that decodes samples to uint8 tensors, and the batch contract's collation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .cache import DecodeCache
from .image_io import DEFAULT_MAX_IMAGE_PIXELS, as_tensor, read_image, read_mask
from .samples import DatasetError, Sample


class AnomalyDataset(Dataset):
    """Decodes samples to uint8 tensors; a decoding failure becomes an `error` entry for the main process."""

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: tuple[int, int],
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        cache: DecodeCache | None = None,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.cache = cache

    def _decode(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        files = (sample.path, *sample.masks)
        cached = self.cache.load(files, self.image_size) if self.cache is not None else None
        if cached is not None:
            return cached
        try:
            image = read_image(sample.path, self.image_size, self.max_pixels)
        except Exception as error:  # corrupt, truncated, too large or unreadable: reported by the main process
            raise DatasetError(f"cannot read image {sample.path}: {error}") from error
        try:
            mask = read_mask(sample.masks, self.image_size)
        except Exception as error:
            raise DatasetError(f"cannot read mask {', '.join(map(str, sample.masks))}: {error}") from error
        if self.cache is not None:
            self.cache.store(files, self.image_size, image, mask)
        return image, mask

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            image, mask = self._decode(sample)
        except DatasetError as error:
            return {"index": index, "path": str(sample.path), "error": str(error)}
        return {
            "image": as_tensor(image.transpose(2, 0, 1)),
            "label": torch.tensor(sample.label, dtype=torch.long),
            "mask": as_tensor(mask)[None],
            "has_mask": torch.tensor(sample.label == 0 or bool(sample.masks)),
            "index": torch.tensor(index, dtype=torch.long),
            "path": str(sample.path),
            "defect_type": sample.defect_type,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The readable items as one batch; unreadable ones under `failed` as {index, path, error}."""
    failed = [item for item in items if "error" in item]
    readable = [item for item in items if "error" not in item]
    batch = default_collate(readable) if readable else {}
    batch["failed"] = failed
    return batch


def to_float_batch(batch: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """The loader carries uint8 (4x less IPC and host-to-device traffic); models get float in [0, 1].

    `strict` raises on a batch with unreadable files (everywhere but predict)."""
    if strict and batch.get("failed"):
        raise DatasetError(batch["failed"][0]["error"])
    if "image" in batch and batch["image"].dtype == torch.uint8:
        batch["image"] = batch["image"].float().div_(255.0)
        batch["mask"] = batch["mask"].float()
    return batch
