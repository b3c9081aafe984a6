"""STFPM (Wang et al., 2021) as a pure nn.Module: a frozen pretrained teacher, a student of the same
architecture trained to match its L2-normalised features at several stages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..components import FeatureExtractor
from ..components.distillation import StageDistanceModel
from ..components.student import StudentNetwork


class STFPMModel(StageDistanceModel):
    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        blur_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, layers, pretrained, weights_path, canonical_batch=None)
        self.student = StudentNetwork(self.extractor, self.extractor.out_indices)
        self.blur_sigma = blur_sigma

    def distances(self, images: Tensor) -> list[Tensor]:
        """Per stage, 1/2 |t - s|^2 of the channel-normalised teacher and student features: (B, h, w)."""
        with torch.no_grad():
            teacher = self.extractor(images)
        student = self.student(images)
        return [
            0.5 * (F.normalize(t, dim=1) - F.normalize(s.float(), dim=1)).pow(2).sum(1)
            for t, s in zip(teacher, student, strict=True)
        ]
