"""Inferencer: score images with an exported bundle, decoded and resized exactly as the training loader does."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import Bundle, load_bundle
from .decision import flagged
from .engines import open_engine
from .image import DEFAULT_MAX_IMAGE_PIXELS, ImageError, as_rgb, decode_image, resize_uint8
from .outputs import map_at_image_size

ImageInput = str | Path | np.ndarray


@dataclass
class Prediction:
    """One image's result: its score, the decision at the bundle's threshold (1 flagged, 0 passed, None without
    a threshold) and its anomaly map at the image's own size (as a viewer shows it)."""

    score: float
    threshold: float | None
    pred: int | None
    anomaly_map: np.ndarray
    path: str | None = None


class Inferencer:
    """Scores images with a bundle written by `lit-anomaly export`, without torch.

    Args:
        bundle: the bundle folder (model files and metadata.json).
        threads: intra-op threads of the engine (default: the engine's own choice).
        category: decide with this category's own threshold (a detector fitted on several categories at once);
            default: the bundle's threshold, class-agnostic for such a detector.
    """

    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None, category: str | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.threshold = self.bundle.threshold_for(category)
        self.engine = open_engine(self.bundle, threads)
        self.image_size = self.bundle.image_size
        self.max_pixels = int(self.bundle.metadata["input"].get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS)

    def load(self, image: ImageInput, name: str = "image") -> tuple[np.ndarray, tuple[int, int]]:
        """`image` (a file, or an (H, W) or (H, W, 3) uint8 array) at the fitted size as (3, H, W) uint8, and its
        own (W, H) as a viewer shows it."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
                channels = image.shape[2] if image.ndim == 3 else None
                raise ImageError(
                    f"{name}: an array of shape {image.shape} and dtype {image.dtype}"
                    f"{f' ({channels} channels)' if channels else ''}; expected (H, W, 3) RGB or (H, W) grey uint8"
                )
            array, size = image, (image.shape[1], image.shape[0])
        else:
            path = Path(image)
            try:
                array, size = decode_image(path, self.image_size, self.max_pixels)
            except ImageError:
                raise
            except Exception as error:
                raise ImageError(f"cannot read image {path}: {error}") from error
        return as_rgb(resize_uint8(array, self.image_size)).transpose(2, 0, 1), size

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N,) and maps (N, H, W) at the fitted size of (N, 3, H, W) uint8 images at that size."""
        expected = (3, *self.image_size)
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ImageError(
                f"images of shape {images.shape} ({images.dtype}); expected (N, {', '.join(map(str, expected))}) uint8"
            )
        return self.engine.run(np.ascontiguousarray(images))

    def predict(self, images: ImageInput | Iterable[ImageInput], batch_size: int = 8) -> list[Prediction]:
        """Each image's score, decision and map; raises ImageError naming the first image it cannot read."""
        items: Sequence[ImageInput] = [images] if isinstance(images, str | Path | np.ndarray) else list(images)
        out: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            loaded = [self.load(item, f"image {start + i}") for i, item in enumerate(chunk)]
            scores, maps = self.score(np.stack([array for array, _ in loaded]))
            for item, (_, size), score, anomaly_map in zip(chunk, loaded, scores, maps, strict=True):
                value = float(score)
                out.append(Prediction(
                    score=value, threshold=self.threshold,
                    pred=None if self.threshold is None else int(flagged(value, self.threshold)),
                    anomaly_map=map_at_image_size(anomaly_map, size),
                    path=None if isinstance(item, np.ndarray) else str(item),
                ))  # fmt: skip
        return out
