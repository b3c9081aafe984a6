"""Image and mask reading for the loader: the runtime's decoding rules, resized with torch's uint8 kernels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..runtime.image import DEFAULT_MAX_IMAGE_PIXELS, decode_image, decode_mask, has_alpha, shown_size, to_rgb_array
from ..runtime.image import check_pixels as _check_pixels
from .samples import DatasetError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS", "check_pixels", "has_alpha", "read_image", "read_mask", "shown_size", "to_rgb_array",
]  # fmt: skip


PIXEL_LIMIT_FLAG = "--data.max_image_pixels"


def check_pixels(image: Image.Image, path: Path, max_pixels: int) -> None:
    """Refuse, from the header alone, an image declaring more pixels than --data.max_image_pixels."""
    _check_pixels(image, path, max_pixels, DatasetError, PIXEL_LIMIT_FLAG)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array`'s memory, or over a copy where the array is read-only (Pillow's arrays, the decode
    cache's memory maps): torch warns about, and must never write to, memory that is not its own."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _resize(array: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 to `size` with torch's uint8 kernels: bilinear with antialias (the runtime's
    `resize_uint8` to the bit); nearest-exact picks the pixels Pillow's NEAREST picks."""
    if array.shape[:2] == tuple(size):
        return array
    planes = as_tensor(array).view(*array.shape[:2], -1).permute(2, 0, 1)[None]
    antialias = mode == "bilinear"
    resized = torch.nn.functional.interpolate(planes, size=tuple(size), mode=mode, antialias=antialias)[0]
    return resized.permute(1, 2, 0).reshape(*size, *array.shape[2:]).numpy()


def read_image(path: Path, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode `path` as a viewer shows it and resize to `size` (H, W) with antialiasing; (H, W, 3) uint8. A
    monochrome frame is resized as one plane, then repeated."""
    array = _resize(decode_image(path, size, max_pixels, DatasetError, PIXEL_LIMIT_FLAG)[0], size, "bilinear")
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def read_mask(paths: Sequence[Path], size: tuple[int, int]) -> np.ndarray:
    """OR of the masks at `paths` (`decode_mask`), nearest-resized to `size`: (H, W) uint8."""
    out = np.zeros(size, dtype=np.uint8)
    for path in paths:
        out |= _resize(decode_mask(path).view(np.uint8), size, "nearest-exact")
    return out
