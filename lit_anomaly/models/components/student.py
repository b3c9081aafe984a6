"""A trainable copy of a backbone's architecture: STFPM's student."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .backbones import FeatureExtractor, channels_first, create_timm_model


class StudentNetwork(nn.Module):
    """The teacher's timm `features_only` architecture and stages, randomly initialised and trainable; it
    normalises [0, 1] images as the teacher does."""

    def __init__(self, teacher: FeatureExtractor, out_indices: Sequence[int]) -> None:
        super().__init__()
        self.model = create_timm_model(teacher.timm_name, pretrained=False, features_only=True, out_indices=out_indices)
        self.register_buffer("mean", teacher.mean.clone())
        self.register_buffer("std", teacher.std.clone())

    def forward(self, images: Tensor) -> list[Tensor]:
        return channels_first(self.model((images - self.mean) / self.std), self.model)
