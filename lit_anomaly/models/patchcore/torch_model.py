"""PatchCore (Roth et al., 2022) as a pure nn.Module: locally aware patch features, a coreset memory bank."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import (
    FeatureExtractor,
    farthest_first,
    greedy_coreset,
    image_blocks,
    nearest_distances,
    nearest_neighbors,
    smooth,
)


class PatchCoreModel(nn.Module):
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
    ) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, layers, pretrained, weights_path)
        self.coreset_ratio = coreset_ratio
        self.coreset_block_size = coreset_block_size
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

    def fit(self, features: Tensor) -> Tensor:
        """Build the memory bank from the training patch features (N, h, w, D); returns the chosen rows."""
        chosen = self.select(features).sort().values  # rows of one image lie together: see leave_one_out_scores
        self.memory_bank = features.flatten(0, 2).index_select(0, chosen).float().contiguous()
        return chosen

    def blocks(self, features: Tensor) -> list[range]:
        """The groups of images of (N, h, w, D) `features` that the coreset is chosen in, one at a time."""
        return image_blocks(len(features), features.shape[1] * features.shape[2], self.coreset_block_size)

    def select(self, features: Tensor) -> Tensor:
        """Rows of the flattened (N, h, w, D) `features` that the memory bank keeps: the union of a greedy
        coreset of each block of images, or all rows at ratio 1."""
        patches = features.flatten(0, 2)
        if self.coreset_ratio >= 1.0:
            return torch.arange(len(patches), device=patches.device)
        per_image, chosen = features.shape[1] * features.shape[2], []
        for block in self.blocks(features):
            rows = patches[block.start * per_image : block.stop * per_image]
            n_select = max(1, round(self.coreset_ratio * len(rows)))
            chosen.append(greedy_coreset(rows, n_select, self.projection_dim, self.seed) + block.start * per_image)
        return torch.cat(chosen)

    def score(self, queries: Tensor, bank: Tensor) -> tuple[Tensor, Tensor]:
        """Patch scores (B, P) and image scores (B,) of patch features (B, P, D) against `bank`."""
        batch, patches, dim = queries.shape
        queries = queries.reshape(-1, dim)
        if not self.reweight:
            patch_scores = nearest_distances(queries, bank).view(batch, patches)
            return patch_scores, patch_scores.amax(dim=1)
        distances, indices = nearest_neighbors(queries, bank)
        patch_scores = distances[:, 0].view(batch, patches)
        scores, best = patch_scores.max(dim=1)
        if len(bank) > 1:
            rows = torch.arange(batch, device=queries.device) * patches + best
            scores = self._reweighted(queries[rows], bank, indices[rows, 0], scores)
        return patch_scores, scores

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        embedding = self.embed(images)
        batch, _, height, width = embedding.shape
        patch_scores, scores = self.score(embedding.flatten(2).transpose(1, 2), self.memory_bank)
        maps = F.interpolate(patch_scores.view(batch, 1, height, width), images.shape[-2:], mode="bilinear")
        maps = smooth(maps, self.blur_sigma)
        return {"score": scores, "anomaly_map": maps}

    def leave_one_out_scores(self, features: Tensor, bank_owner: Tensor, images: Tensor) -> Tensor:
        """Scores of train `images` (ascending indices into `features`, (N, h, w, D)), each against the memory
        bank as a refit without it would be: the rows it contributed (`bank_owner`: the image of each bank row)
        are removed, and as many are chosen again, farthest first, among the patches of its block's other
        images that they were nearest to. Removal alone leaves holes a refit fills, and scores run high;
        repaired, they match unseen normals (benchmarks/calibration.py).
        """
        _, height, width, dim = features.shape
        per_image = height * width
        patches = features.reshape(-1, dim)
        own_rows = torch.searchsorted(bank_owner, torch.stack([images, images + 1], 1))  # the bank is in image order
        scores, block, repair = [], None, None
        for image, (first, stop) in zip(images.tolist(), own_rows.tolist(), strict=True):
            if block is None or image not in block:
                block = next(b for b in self.blocks(features) if image in b)
                repair = self._repair_candidates(patches, bank_owner, block, per_image)
            nearest_owner, uncovered, image_of, block_patches = repair
            orphans = torch.nonzero((nearest_owner == image) & (image_of != image)).squeeze(1)
            candidates = block_patches.index_select(0, orphans).float()
            refill = candidates[farthest_first(candidates, uncovered[orphans], int((bank_owner == image).sum()))]
            own = patches[image * per_image : (image + 1) * per_image].float()
            if self.reweight:  # the reweighting looks at bank neighbourhoods: score against the whole repaired bank
                bank = torch.cat([self.memory_bank[bank_owner != image], refill])
                scores.append(self.score(own[None], bank)[1])
                continue
            references = (self.memory_bank[:first], self.memory_bank[stop:], refill)  # every row but its own
            distances = [nearest_distances(own, r) for r in references if len(r)]
            scores.append(torch.stack(distances).amin(0).max().view(1) if distances else own.new_full((1,), math.inf))
        return torch.cat(scores) if scores else features.new_empty(0, dtype=torch.float32)

    def _repair_candidates(
        self, patches: Tensor, bank_owner: Tensor, block: range, per_image: int, chunk: int = 2048
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For every patch of `block`: the image owning its nearest bank row of the block, and its distance to
        the nearest block row of another owner (what covers it once that image is left out); with each
        patch's image and the block's patches. One pass over block patches x block bank, in fixed-shape chunks."""
        in_block = (bank_owner >= block.start) & (bank_owner < block.stop)
        bank, owners = self.memory_bank[in_block], bank_owner[in_block]
        block_patches = patches[block.start * per_image : block.stop * per_image]
        bank_norms, n = (bank * bank).sum(1), len(block_patches)
        padded = F.pad(block_patches, (0, 0, 0, -n % chunk))
        nearest_owner, uncovered = [], []
        for start in range(0, len(padded), chunk):
            q = padded[start : start + chunk].float()
            squared = torch.addmm(bank_norms, q, bank.T, alpha=-2.0).add_((q * q).sum(1, keepdim=True))
            owner = owners[squared.argmin(1)]
            nearest_owner.append(owner)
            uncovered.append(squared.masked_fill_(owners == owner[:, None], float("inf")).amin(1))
        image_of = torch.arange(block.start, block.stop, device=patches.device).repeat_interleave(per_image)
        return torch.cat(nearest_owner)[:n], torch.cat(uncovered)[:n].clamp_min(0).sqrt(), image_of, block_patches

    def cross_fit_scores(self, features: Tensor, folds: Tensor, fold: int, images: Tensor, chunk: int = 16) -> Tensor:
        """Scores of `images` (indices into `features`, all in `fold`) against a memory bank built, as `fit`
        builds it, from the other folds."""
        if not len(images):
            return features.new_empty(0, dtype=torch.float32)
        patches = features.shape[1] * features.shape[2]
        inside = images
        outside = features[folds != fold]
        bank = outside.flatten(0, 2).index_select(0, self.select(outside)).float()
        scores = []
        for start in range(0, len(inside), chunk):
            queries = features.index_select(0, inside[start : start + chunk]).flatten(1, 2).float()
            scores.append(self.score(queries.reshape(len(queries), patches, -1), bank)[1])
        return torch.cat(scores)

    def _reweighted(self, query: Tensor, bank: Tensor, nearest: Tensor, scores: Tensor) -> Tensor:
        """Paper eq. 7: damp the score when the nearest bank patch sits in a dense neighbourhood."""
        k = min(self.num_neighbors, len(bank))
        _, neighbourhood = nearest_neighbors(bank[nearest], bank, k=k)
        distances = torch.linalg.vector_norm(query[:, None] - bank[neighbourhood], dim=-1)
        weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weights * scores
