"""Gaussian smoothing of anomaly maps, as PatchCore and PaDiM do before taking maxima."""

from __future__ import annotations

from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel size covering +-4 sigma."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def smooth(maps: Tensor, sigma: float) -> Tensor:
    """Blur (B, 1, H, W) maps with a Gaussian of `sigma` px; unchanged for sigma <= 0."""
    if sigma <= 0:
        return maps
    return gaussian_blur(maps, [blur_kernel_size(sigma)] * 2, [sigma] * 2)
