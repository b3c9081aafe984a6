"""Decoding images and masks as the training loader does, with numpy and Pillow only.

The training loader (`lit_anomaly.data.image_io`) and the torch-free runtime share every rule here: EXIF
orientation, any file mode to uint8 RGB, the pixel limit, masks with alpha. The loader resizes with torch's
uint8 kernel; `resize_uint8` is the same kernel in numpy, to the bit, for the runtime.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height

# 8-bit-or-less PNGs decode through libspng (pyspng) where it is installed: the pixels Pillow decodes (PNG is
# lossless; a test checks every mode), at half of libpng's cost on large images.
_SPNG_RGB_MODES = ("1", "L", "P", "LA", "RGB", "RGBA")  # what Pillow opens PNGs of 8 bits or fewer as
_SPNG_RAW_MODES = ("L", "LA", "RGB", "RGBA")  # masks: sample values as stored, as np.asarray(Pillow image) gives


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and what is expected."""


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of `image` (1: stored as shown), read from the header without decoding. A PNG's
    EXIF counts where its eXIf chunk precedes the pixels: Pillow finds a later one only by decoding them all."""
    try:
        if image.format == "PNG":
            exif = Image.Exif()
            exif.load(image.info.get("exif") or b"")
        else:
            exif = image.getexif()
        value = exif.get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: the pixels are shown as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(W, H) of `image` as a viewer shows it, after its EXIF orientation."""
    width, height = image.size
    return (height, width) if orientation(image) in _TRANSPOSED_ORIENTATIONS else (width, height)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode (L, I;16, I, F, P, RGBA, CMYK, ...) as an (H, W, 3) uint8 array. Integer images above 8
    bits are scaled from 16 bits; float images (mode F) hold 0..1, and other values are refused."""
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min(initial=0)), float(array.max(initial=0))
        if low < 0 or high > 1 or not np.isfinite(array).all():
            raise ImageError(
                f"a float image holds values from {low:.4g} to {high:.4g}; expected 0..1 (save 8- or 16-bit "
                "integers for 0..255 or 0..65535)"
            )
        return np.repeat(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode.startswith("I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode in ("P", "PA", "LA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def check_pixels(
    image: Image.Image, path: Path, max_pixels: int, error: type[ValueError] = ImageError, flag: str = "the limit"
) -> None:
    """Refuse, from the header alone, an image declaring more pixels than `max_pixels` (a decompression bomb
    or a wrong file): decoding it could take gigabytes."""
    if image.width * image.height > max_pixels:
        raise error(
            f"{path} declares {image.width}x{image.height} = {image.width * image.height / 1e6:.0f} Mpx, above "
            f"{flag} {max_pixels / 1e6:.0f} Mpx; raise the limit if the image is genuine"
        )


def _read_pillow_or_spng(path: Path, image: Image.Image, spng_format: str | None, modes: Sequence[str]) -> np.ndarray:
    if image.format == "PNG" and image.mode in modes:
        data = path.read_bytes()
        if data[24] <= 8:  # IHDR bit depth; Pillow shows 16-bit RGB as mode RGB too
            try:
                import pyspng  # a C extension: loads in a millisecond, but only readers need it
            except ImportError:  # the runtime without it: Pillow decodes the same pixels
                pyspng = None
            if pyspng is not None:
                return pyspng.load(data, format=spng_format)
    return to_rgb_array(image) if spng_format == "RGB" else np.asarray(image)


def decode_image(
    path: Path,
    size: tuple[int, int],
    max_pixels: int,
    error: type[ValueError] = ImageError,
    flag: str = "the bundle's max_image_pixels",
) -> tuple[np.ndarray, tuple[int, int]]:
    """`path` decoded as a viewer shows it (EXIF orientation), not yet resized to `size` (H, W): (H, W) uint8
    for a monochrome frame (resized as one plane, then repeated), else (H, W, 3) uint8; and the image's own
    (W, H) as a viewer shows it. JPEGs much larger than `size` decode at reduced scale."""
    with Image.open(path) as image:
        check_pixels(image, path, max_pixels, error, flag)
        shown = shown_size(image)  # before `draft`, which shrinks the size JPEGs report
        if image.format == "JPEG":
            image.draft("RGB", (size[1], size[0]))
        if orientation(image) != 1:
            return to_rgb_array(ImageOps.exif_transpose(image)), shown
        if image.mode == "L":
            return _read_pillow_or_spng(path, image, None, ("L",)), shown
        return _read_pillow_or_spng(path, image, "RGB", _SPNG_RGB_MODES), shown


def as_rgb(array: np.ndarray) -> np.ndarray:
    """(H, W) grey or (H, W, 3) to (H, W, 3)."""
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


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


def decode_mask(path: Path) -> np.ndarray:
    """The defect pixels of the mask at `path` (`mask_values`), as a viewer shows it: (H, W) bool."""
    with Image.open(path) as mask:
        if orientation(mask) != 1:
            return mask_values(np.asarray(ImageOps.exif_transpose(mask)))
        return mask_values(_read_pillow_or_spng(path, mask, None, _SPNG_RAW_MODES))


# ---- torch's uint8 antialiased bilinear resize, in numpy -------------------------------------------------------
@functools.lru_cache(maxsize=64)  # a line's frames share their sizes: the weights are built once per pair
def _resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First input index (out,), integer weights (out, taps) and their fixed-point precision, as torch's uint8
    antialiased bilinear kernel computes them (Pillow's resampling coefficients, triangle filter)."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    starts = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - first
        w = np.maximum(0.0, 1.0 - np.abs((np.arange(count) + first - center + 0.5) * invscale))
        total = w.sum()
        starts[i], weights[i, :count] = first, w / total if total != 0 else w
    largest, precision = weights.max(), 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    integers = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)
    starts.flags.writeable = integers.flags.writeable = False  # cached: shared by every later call
    return starts, integers, precision


def _resize_axis(array: np.ndarray, axis: int, out_size: int, group: int = 32) -> np.ndarray:
    """One separable pass along `axis`. Sums of integer products stay below 2^53, so float64 matrix products
    give them exactly; each group of outputs multiplies only the band of inputs it reads."""
    in_size = array.shape[axis]
    starts, weights, precision = _resize_weights(in_size, out_size)
    taps = weights.shape[1]
    moved = np.moveaxis(array, axis, -1).astype(np.float64)
    sums = np.empty((*moved.shape[:-1], out_size), np.float64)
    for first in range(0, out_size, group):
        last = min(first + group, out_size)
        low, high = int(starts[first]), min(int(starts[last - 1]) + taps, in_size)
        band = np.zeros((high - low, last - first), np.float64)
        for k in range(taps):
            index = starts[first:last] + k
            inside = index < high
            band[index[inside] - low, np.arange(last - first)[inside]] += weights[first:last][inside, k]
        sums[..., first:last] = moved[..., low:high] @ band
    rounded = (sums.astype(np.int64) + (1 << (precision - 1))) >> precision
    return np.moveaxis(np.clip(rounded, 0, 255).astype(np.uint8), -1, axis)


def resize_uint8(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 to `size` (H, W) exactly as torch's `interpolate(mode="bilinear",
    antialias=True)` resizes uint8 (width first, then height, each pass rounded to uint8)."""
    height, width = size
    if array.shape[1] != width:
        array = _resize_axis(array, 1, width)
    if array.shape[0] != height:
        array = _resize_axis(array, 0, height)
    return array


def _lerp_axis(values: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """Linear interpolation along `axis` on pixel centres, clamped at the borders (align_corners=False)."""
    in_size = values.shape[axis]
    source = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    shape = [1] * values.ndim
    shape[axis] = out_size
    fraction = (source - low).astype(values.dtype).reshape(shape)
    first = np.take(values, low, axis=axis)
    return first + (np.take(values, high, axis=axis) - first) * fraction


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float (h, w) map to `size` (H, W) by bilinear interpolation on pixel centres (torch's
    `interpolate(mode="bilinear", align_corners=False)` to float32 rounding), as float32."""
    height, width = size
    columns = _lerp_axis(np.asarray(anomaly_map, dtype=np.float32), 1, width)  # on the small map first
    return _lerp_axis(columns, 0, height)
