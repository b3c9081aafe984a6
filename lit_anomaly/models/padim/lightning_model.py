"""PaDiM lifecycle: sum sufficient statistics on every rank, all-reduce them, invert once everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor

from ..base import AnomalyModule
from .torch_model import PaDiMModel


class PaDiM(AnomalyModule):
    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        n_features: int = 100,
        covariance_eps: float = 0.01,
        blur_sigma: float = 4.0,
        seed: int = 0,
        calibration_quantile: float | None = None,
        contamination: float | None = None,
        pixel_eval_size: int | None = None,
        aupro_fpr_limit: float = 0.3,
    ) -> None:
        super().__init__(calibration_quantile, contamination, pixel_eval_size, aupro_fpr_limit)
        self.save_hyperparameters()
        self.model = PaDiMModel(
            backbone, layers, pretrained, weights_path, n_features, covariance_eps, blur_sigma, seed
        )
        self._stats: list[Tensor] | None = None

    def learn(self, batch: dict[str, Any]) -> None:
        fresh = self.first_occurrences(batch["index"])
        total, outer, count = self._stats or (None, None, 0)
        total, outer = self.model.accumulate(self.model.embed(batch["image"][fresh]), total, outer)
        self._stats = [total, outer, count + fresh.sum().double()]

    def finish_fit(self) -> None:
        total, outer, count = self._stats
        if self.trainer.world_size > 1:
            for tensor in (total, outer, count):
                dist.all_reduce(tensor)
        self.model.fit(total, outer, int(count.item()))
        self._stats = None

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.model(images)
