"""A trainable copy of a backbone's architecture: STFPM's student."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .backbones import (
    FeatureExtractor,
    channels_first,
    create_timm_model,
    drop_blocks_past_the_last_stage,
    drop_saved_blocks,
)  # fmt: skip


class StudentNetwork(nn.Module):
    """The teacher's timm `features_only` architecture and stages, randomly initialised and trainable; it
    normalises [0, 1] images as the teacher does."""

    def __init__(self, teacher: FeatureExtractor, out_indices: Sequence[int]) -> None:
        super().__init__()
        self.model = create_timm_model(teacher.timm_name, pretrained=False, features_only=True, out_indices=out_indices)
        drop_blocks_past_the_last_stage(self.model)  # initialised in full first: the kept blocks start as before
        self.register_buffer("mean", teacher.mean.clone())
        self.register_buffer("std", teacher.std.clone())
        self.register_load_state_dict_pre_hook(_drop_older_blocks)

    def forward(self, images: Tensor) -> list[Tensor]:
        return channels_first(self.model((images - self.mean) / self.std), self.model)


def _drop_older_blocks(student: StudentNetwork, state: dict, prefix: str, *args: Any) -> None:
    """Older checkpoints hold the blocks past the student's last stage."""
    drop_saved_blocks(student.model, state, f"{prefix}model.")
