"""PatchCore lifecycle: collect patch features on every rank, gather, build one coreset everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..base import AnomalyModule, gather_by_index
from .torch_model import PatchCoreModel


class PatchCore(AnomalyModule):
    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int | str] = (2, 3),
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        num_neighbors: int = 9,
        reweight: bool = False,
        blur_sigma: float = 4.0,
        seed: int = 0,
        calibration_quantile: float | None = None,
        contamination: float | None = None,
        pixel_eval_size: int | None = None,
        aupro_fpr_limit: float = 0.3,
    ) -> None:
        super().__init__(calibration_quantile, contamination, pixel_eval_size, aupro_fpr_limit)
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"--model.coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.save_hyperparameters()
        self.model = PatchCoreModel(
            backbone, layers, pretrained, weights_path, coreset_ratio, projection_dim,
            num_neighbors, reweight, blur_sigma, seed,
        )  # fmt: skip
        self._features: list[Tensor] = []
        self._indices: list[Tensor] = []

    def learn(self, batch: dict[str, Any]) -> None:
        embedding = self.model.embed(batch["image"])
        # half precision halves the largest buffer of a fit; the coreset picks rows, the bank stays float32
        self._features.append(embedding.permute(0, 2, 3, 1).to(torch.float16))
        self._indices.append(batch["index"])

    def finish_fit(self) -> None:
        features = torch.cat(self._features)  # (N, h, w, D)
        _, features = gather_by_index(self, torch.cat(self._indices), features)
        self._features, self._indices = [], []
        self.model.fit(features.reshape(-1, features.shape[-1]))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.model(images)
