"""Image and mask decoding: any file mode to uint8 RGB or a binary mask, resized as the loader resizes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .samples import DatasetError


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode (L, I;16, I, F, P, RGBA, CMYK, ...) as an (H, W, 3) uint8 array."""
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            top = max(1.0, float(array.max(initial=0)))
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode in ("P", "PA", "LA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


def check_pixels(image: Image.Image, path: Path, max_pixels: int) -> None:
    """Refuse, from the header alone, an image declaring more pixels than `max_pixels` (a decompression bomb
    or a wrong file): decoding it could take gigabytes."""
    if image.width * image.height > max_pixels:
        raise DatasetError(
            f"{path} declares {image.width}x{image.height} = {image.width * image.height / 1e6:.0f} Mpx, above "
            f"--data.max_image_pixels {max_pixels / 1e6:.0f} Mpx; raise the limit if the image is genuine"
        )


# 8-bit-or-less PNGs decode through libspng (pyspng), twice as fast as libpng on large images, with the pixels
# Pillow decodes (PNG is lossless; a test checks every mode). 16-bit PNGs keep Pillow's exact scaling.
_SPNG_RGB_MODES = ("1", "L", "P", "LA", "RGB", "RGBA")  # what Pillow opens PNGs of 8 bits or fewer as
_SPNG_RAW_MODES = ("L", "LA", "RGB", "RGBA")  # masks: sample values as stored, as np.asarray(Pillow image) gives


def _read_pillow_or_spng(path: Path, image: Image.Image, spng_format: str | None, modes: Sequence[str]) -> np.ndarray:
    if image.format == "PNG" and image.mode in modes:
        data = path.read_bytes()
        if data[24] <= 8:  # IHDR bit depth; Pillow shows 16-bit RGB as mode RGB too
            import pyspng  # a C extension: loads in a millisecond, but only readers need it

            return pyspng.load(data, format=spng_format)
    return to_rgb_array(image) if spng_format == "RGB" else np.asarray(image)


def _resize(array: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 to `size` with torch's uint8 kernels: bilinear with antialias matches Pillow's
    full resampling to one grey level, at a fifth of its cost; nearest-exact picks the pixels Pillow's NEAREST picks."""
    if array.shape[:2] == tuple(size):
        return array
    planes = torch.from_numpy(np.ascontiguousarray(array)).view(*array.shape[:2], -1).permute(2, 0, 1)[None]
    antialias = mode == "bilinear"
    resized = torch.nn.functional.interpolate(planes, size=tuple(size), mode=mode, antialias=antialias)[0]
    return resized.permute(1, 2, 0).reshape(*size, *array.shape[2:]).numpy()


EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of `image` (1: stored as shown), read from the header without decoding."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: the pixels are shown as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(W, H) of `image` as a viewer shows it, after its EXIF orientation."""
    width, height = image.size
    return (height, width) if orientation(image) in _TRANSPOSED_ORIENTATIONS else (width, height)


def read_image(path: Path, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode `path`, turned as its EXIF orientation says (as every viewer shows it), and resize to `size`
    (H, W) with antialiasing; returns (H, W, 3) uint8."""
    with Image.open(path) as image:
        check_pixels(image, path, max_pixels)
        if image.format == "JPEG":
            image.draft("RGB", (size[1], size[0]))  # decode JPEGs at reduced scale when much larger
        if orientation(image) != 1:
            return _resize(to_rgb_array(ImageOps.exif_transpose(image)), size, "bilinear")
        if image.mode == "L":  # a monochrome camera's frame: decoded and resized as one plane, then repeated
            grey = _read_pillow_or_spng(path, image, None, ("L",))
            return np.repeat(_resize(grey, size, "bilinear")[..., None], 3, axis=2)
        array = _read_pillow_or_spng(path, image, "RGB", _SPNG_RGB_MODES)
    return _resize(array, size, "bilinear")


def mask_values(values: np.ndarray) -> np.ndarray:
    """Defect pixels of a decoded mask: any positive value in its colour or grey channels. An alpha channel
    (grey + alpha, RGBA) is read only where it carries the mask: when the colour channels are all zero and
    the alpha varies. An opaque background's alpha is never taken for defect."""
    if values.ndim == 2:
        return values > 0
    if values.shape[2] not in (2, 4):
        return values.max(axis=2) > 0
    colour, alpha = values[..., :-1].max(axis=2), values[..., -1]
    if not colour.any() and alpha.min() != alpha.max():
        return alpha > 0
    return colour > 0


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("LA", "PA", "RGBA", "La", "RGBa") or "transparency" in image.info


def read_mask(paths: Sequence[Path], size: tuple[int, int]) -> np.ndarray:
    """OR of the masks at `paths` (`mask_values`), turned as their EXIF orientation says and nearest-resized
    to `size`: (H, W) uint8."""
    out = np.zeros(size, dtype=np.uint8)
    for path in paths:
        with Image.open(path) as mask:
            if orientation(mask) != 1:
                values = np.asarray(ImageOps.exif_transpose(mask))
            else:
                values = _read_pillow_or_spng(path, mask, None, _SPNG_RAW_MODES)
        out |= _resize(mask_values(values).view(np.uint8), size, "nearest-exact")
    return out
