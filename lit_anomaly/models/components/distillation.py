"""What distillation detectors share: per-stage distance maps become the loss, the anomaly map and the score."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .blur import smooth


class StageDistanceModel(nn.Module):
    """A model whose `distances(images)` gives one (B, h, w) map per backbone stage (STFPM, Reverse
    Distillation): training minimises their spatial means, the anomaly map is their sum at image size."""

    blur_sigma: float = 0.0

    def distances(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def loss(self, images: Tensor) -> Tensor:
        """Per stage, the mean over positions of the distance; summed over stages (both papers' losses)."""
        return sum(d.mean() for d in self.distances(images))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        size = images.shape[-2:]
        maps = smooth(
            sum(F.interpolate(d[:, None], size, mode="bilinear") for d in self.distances(images)), self.blur_sigma
        )
        return {"score": maps.flatten(1).amax(1), "anomaly_map": maps}
