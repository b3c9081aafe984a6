"""PatchCore (Roth et al., 2022) as a pure nn.Module: locally aware patch features, a coreset memory bank."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import FeatureExtractor, farthest_first, greedy_coreset, nearest_neighbors, smooth


class PatchCoreModel(nn.Module):
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
    ) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, layers, pretrained, weights_path)
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.blur_sigma = blur_sigma
        self.seed = seed
        self.register_buffer("memory_bank", torch.empty(0, sum(self.extractor.channels)))

    @property
    def feature_dim(self) -> int:
        return self.memory_bank.shape[1]

    def embed(self, images: Tensor) -> Tensor:
        """Locally aware patch features (B, D, h, w) at the resolution of the first chosen stage."""
        features = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in self.extractor(images)]
        size = features[0].shape[-2:]
        features = [f if f.shape[-2:] == size else F.interpolate(f, size, mode="bilinear") for f in features]
        return torch.cat(features, dim=1)

    @staticmethod
    def flatten(embedding: Tensor) -> Tensor:
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

    def fit(self, patches: Tensor) -> Tensor:
        """Build the memory bank from all training patch features (N, D); returns the chosen rows."""
        self.memory_bank = patches.index_select(0, chosen := self.select(patches)).float().contiguous()
        return chosen

    def select(self, patches: Tensor) -> Tensor:
        """Rows of `patches` the memory bank keeps: a greedy coreset, or all of them at ratio 1."""
        if self.coreset_ratio >= 1.0:
            return torch.arange(len(patches), device=patches.device)
        n_select = max(1, round(self.coreset_ratio * len(patches)))
        return greedy_coreset(patches, n_select, self.projection_dim, self.seed)

    def score(
        self, queries: Tensor, bank: Tensor, query_groups: Tensor | None = None, bank_groups: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Patch scores (B, P) and image scores (B,) of patch features (B, P, D) against `bank`.

        With groups, a patch is never compared with bank rows of its own group (see `nearest_neighbors`).
        """
        batch, patches, dim = queries.shape
        queries = queries.reshape(-1, dim)
        distances, indices = nearest_neighbors(queries, bank, 1, query_groups=query_groups, bank_groups=bank_groups)
        patch_scores = distances[:, 0].view(batch, patches)
        scores, best = patch_scores.max(dim=1)
        if self.reweight and len(bank) > 1:
            rows = torch.arange(batch, device=queries.device) * patches + best
            group = query_groups[rows] if query_groups is not None else None
            scores = self._reweighted(queries[rows], bank, indices[rows, 0], scores, group, bank_groups)
        return patch_scores, scores

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        embedding = self.embed(images)
        batch, _, height, width = embedding.shape
        patch_scores, scores = self.score(embedding.flatten(2).transpose(1, 2), self.memory_bank)
        maps = F.interpolate(patch_scores.view(batch, 1, height, width), images.shape[-2:], mode="bilinear")
        maps = smooth(maps, self.blur_sigma)
        return {"score": scores, "anomaly_map": maps}

    def leave_one_out_scores(self, features: Tensor, bank_owner: Tensor, images: Tensor) -> Tensor:
        """Scores of train `images` (indices into `features`, (N, h, w, D)), each against the memory bank as a
        refit without it would be: the rows it contributed (`bank_owner`: the image of each bank row) are
        removed, and as many are chosen again, farthest first, among the other images' patches they were
        nearest to. Removal alone leaves holes a refit fills, and scores run high; repaired, they match
        unseen normals (benchmarks/calibration.py).
        """
        n, height, width, dim = features.shape
        per_image = height * width
        patches = features.reshape(-1, dim)
        image_of = torch.arange(n, device=patches.device).repeat_interleave(per_image)
        nearest_owner, uncovered, without_own = self._owner_distances(patches, image_of, bank_owner)
        scores = []
        for image in images.tolist():
            own = patches[image * per_image : (image + 1) * per_image].float()
            orphans = torch.nonzero((nearest_owner == image) & (image_of != image)).squeeze(1)
            candidates = patches.index_select(0, orphans).float()
            refill = candidates[farthest_first(candidates, uncovered[orphans], int((bank_owner == image).sum()))]
            if self.reweight:  # the reweighting looks at bank neighbourhoods: score against the whole repaired bank
                bank = torch.cat([self.memory_bank[bank_owner != image], refill])
                scores.append(self.score(own[None], bank)[1])
                continue
            patch_scores = without_own[image * per_image : (image + 1) * per_image]
            if len(refill):
                patch_scores = torch.minimum(patch_scores, nearest_neighbors(own, refill)[0][:, 0])
            scores.append(patch_scores.max().view(1))
        return torch.cat(scores) if scores else features.new_empty(0, dtype=torch.float32)

    def _owner_distances(
        self, patches: Tensor, image_of: Tensor, bank_owner: Tensor, chunk: int = 2048
    ) -> tuple[Tensor, Tensor, Tensor]:
        """For every patch: the image that owns its nearest bank row; its distance to the nearest row of
        another owner (what covers it once that image is left out); its distance to the nearest row not
        taken from its own image. One pass over patches x bank, in fixed-shape chunks."""
        bank, n = self.memory_bank, len(patches)
        bank_norms = (bank * bank).sum(1)
        padded, groups = F.pad(patches, (0, 0, 0, -n % chunk)), F.pad(image_of, (0, -n % chunk), value=-1)
        nearest_owner, uncovered, without_own = [], [], []
        for start in range(0, len(padded), chunk):
            q = padded[start : start + chunk].float()
            squared = torch.addmm(bank_norms, q, bank.T, alpha=-2.0).add_((q * q).sum(1, keepdim=True))
            owner = bank_owner[squared.argmin(1)]
            nearest_owner.append(owner)
            uncovered.append(squared.masked_fill(bank_owner == owner[:, None], float("inf")).amin(1))
            own = bank_owner == groups[start : start + chunk, None]
            without_own.append(squared.masked_fill_(own, float("inf")).amin(1))
        return torch.cat(nearest_owner)[:n], *(
            torch.cat(parts)[:n].clamp_min(0).sqrt() for parts in (uncovered, without_own)
        )

    def cross_fit_scores(self, features: Tensor, folds: Tensor, fold: int, chunk: int = 16) -> Tensor:
        """Scores of the images of `fold` against a memory bank built, as `fit` builds it, from the other folds."""
        patches = features.shape[1] * features.shape[2]
        inside = torch.nonzero(folds == fold).squeeze(1)
        outside = features[folds != fold].flatten(0, 2)
        bank = outside.index_select(0, self.select(outside)).float()
        scores = []
        for start in range(0, len(inside), chunk):
            queries = features.index_select(0, inside[start : start + chunk]).flatten(1, 2).float()
            scores.append(self.score(queries.reshape(len(queries), patches, -1), bank)[1])
        return torch.cat(scores)

    def _reweighted(
        self,
        query: Tensor,
        bank: Tensor,
        nearest: Tensor,
        scores: Tensor,
        query_groups: Tensor | None = None,
        bank_groups: Tensor | None = None,
    ) -> Tensor:
        """Paper eq. 7: damp the score when the nearest bank patch sits in a dense neighbourhood."""
        k = min(self.num_neighbors, len(bank))
        _, neighbourhood = nearest_neighbors(
            bank[nearest], bank, k=k, query_groups=query_groups, bank_groups=bank_groups
        )
        distances = torch.linalg.vector_norm(query[:, None] - bank[neighbourhood], dim=-1)
        weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weights * scores
