"""PatchCore (Roth et al., 2022) as a pure nn.Module: locally aware patch features, a coreset memory bank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import (
    FeatureExtractor,
    farthest_first,
    greedy_coreset,
    image_blocks,
    largest_nearest_distances,
    nearest_distances,
    nearest_neighbors,
    smooth,
)


@dataclass(frozen=True)
class BlockCover:
    """How the bank rows chosen in a block of train images cover that block's patches (all rows in image order).

    Args:
        images: the block's images.
        patches: their patch features (P, D), image after image.
        image_of: the image of each patch (P,).
        nearest: each patch's distance to its nearest bank row of the block (P,).
        nearest_owner: the image that row came from (P,).
        uncovered: the distance to the nearest block row of another image than that: what covers the patch once
            `nearest_owner` is left out (P,).
        rows: the block's rows of the bank.
    """

    images: range
    patches: Tensor
    image_of: Tensor
    nearest: Tensor
    nearest_owner: Tensor
    uncovered: Tensor
    rows: range


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
        bank_size: int | None = None,
        score_top_k: int = 1,
        tile_size: int | None = None,
        tile_overlap: int = 0,
    ) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained, weights_path, tile_size=tile_size, tile_overlap=tile_overlap
        )
        self.bank_size = bank_size
        self.score_top_k = score_top_k
        self.coreset_ratio = coreset_ratio
        self.coreset_block_size = coreset_block_size
        self.groups: list[int] | None = None  # a unified fit's categories, while fitting (`fit`)
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

    def fit(self, features: Tensor, groups: Sequence[int] | None = None) -> Tensor:
        """Build the memory bank from the training patch features (N, h, w, D); returns the chosen rows. `groups`:
        the sizes of consecutive runs of images of one category (a unified fit), each chosen in blocks of its own,
        so that each category keeps its share of the bank as if fitted alone."""
        self.groups = list(groups) if groups is not None else None
        # sorted, the rows of one image lie together: see leave_one_out_scores
        chosen = self.select(features, self.groups).sort().values
        self.memory_bank = features.flatten(0, 2).index_select(0, chosen).float().contiguous()
        return chosen

    def blocks(self, features: Tensor, groups: Sequence[int] | None = None) -> list[range]:
        """The groups of images of (N, h, w, D) `features` that the coreset is chosen in, one at a time; none spans
        two of `groups` (sizes of consecutive runs of images of one category)."""
        rows_per_image = features.shape[1] * features.shape[2]
        return image_blocks(len(features), rows_per_image, self.coreset_block_size, groups)

    def select(self, features: Tensor, groups: Sequence[int] | None = None) -> Tensor:
        """Rows of the flattened (N, h, w, D) `features` that the memory bank keeps: the union of a greedy
        coreset of each block of images, each its share of `coreset_ratio` of all rows or of `bank_size`, whichever
        is fewer; all rows at ratio 1 and no bank_size."""
        patches = features.flatten(0, 2)
        share = self.coreset_ratio if self.bank_size is None else min(self.coreset_ratio, self.bank_size / len(patches))
        if share >= 1.0:
            return torch.arange(len(patches), device=patches.device)
        per_image, chosen = features.shape[1] * features.shape[2], []
        for block in self.blocks(features, groups):
            rows = patches[block.start * per_image : block.stop * per_image]
            n_select = max(1, round(share * len(rows)))
            chosen.append(greedy_coreset(rows, n_select, self.projection_dim, self.seed) + block.start * per_image)
        return torch.cat(chosen)

    def score(self, queries: Tensor, bank: Tensor) -> tuple[Tensor, Tensor]:
        """Patch scores (B, P) and image scores (B,) of patch features (B, P, D) against `bank`: the mean of the
        `score_top_k` largest patch scores (the paper's maximum at 1)."""
        batch, patches, dim = queries.shape
        k = min(self.score_top_k, patches)
        queries = queries.reshape(-1, dim)
        if not self.reweight:
            bank_norms = (bank * bank).sum(1)
            patch_scores = nearest_distances(queries, bank, bank_norms=bank_norms).view(batch, patches)
            rows = self._top_rows(patch_scores, k)
            return patch_scores, self._farthest_distances(queries[rows], bank, bank_norms).view(batch, k).mean(1)
        distances, indices = nearest_neighbors(queries, bank)
        patch_scores = distances[:, 0].view(batch, patches)
        rows = self._top_rows(patch_scores, k)
        scores = torch.linalg.vector_norm(queries[rows] - bank[indices[rows, 0]], dim=1)
        if len(bank) > 1:
            scores = self._reweighted(queries[rows], bank, indices[rows, 0], scores)
        return patch_scores, scores.view(batch, k).mean(1)

    @staticmethod
    def _top_rows(patch_scores: Tensor, k: int) -> Tensor:
        """Rows (B * k,) of the flattened queries that hold each image's k largest patch scores."""
        batch, patches = patch_scores.shape
        offsets = torch.arange(batch, device=patch_scores.device)[:, None] * patches
        return (patch_scores.topk(k, dim=1).indices + offsets).flatten()

    @staticmethod
    def _farthest_distances(queries: Tensor, bank: Tensor, bank_norms: Tensor) -> Tensor:
        """Distances (B,) of each image's farthest patch (`queries`, (B, D)) to its nearest bank row, as |q - b|.
        The expansion |q|^2 - 2 q.b + |b|^2 that finds the row loses digits where distances are small against
        the features' norms, differently on every engine; an image score computed so agrees across engines."""
        index = torch.addmm(bank_norms, queries, bank.T, alpha=-2.0).argmin(dim=1)
        return torch.linalg.vector_norm(queries - bank[index], dim=1)

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
        repaired, they match unseen normals (benchmarks/calibration.py). An image's score comes from its
        `score_top_k` farthest patches, so the other blocks' rows are searched only for patches that the block's rows
        leave far enough to be among them (`largest_nearest_distances`). All of an image's patches, from all its
        tiles, leave together: the bank knows rows by image.
        """
        _, height, width, dim = features.shape
        per_image = height * width
        patches = features.reshape(-1, dim)
        scores, cover, bank_norms = [], None, (self.memory_bank * self.memory_bank).sum(1)
        winners, refills = [], []
        for image in images.tolist():
            if cover is None or image not in cover.images:
                block = next(b for b in self.blocks(features, self.groups) if image in b)
                cover = self._block_cover(patches, bank_owner, bank_norms, block, per_image)
            orphans = torch.nonzero((cover.nearest_owner == image) & (cover.image_of != image)).squeeze(1)
            candidates = cover.patches.index_select(0, orphans).float()
            refill = candidates[farthest_first(candidates, cover.uncovered[orphans], int((bank_owner == image).sum()))]
            own = slice((image - cover.images.start) * per_image, (image - cover.images.start + 1) * per_image)
            queries = cover.patches[own].float()
            if self.reweight:  # the reweighting looks at bank neighbourhoods: score against the whole repaired bank
                bank = torch.cat([self.memory_bank[bank_owner != image], refill])
                scores.append(self.score(queries[None], bank)[1])
                continue
            # every row but its own: the block's other rows (measured by the cover), the refill, the other blocks'
            in_block = torch.where(cover.nearest_owner[own] == image, cover.uncovered[own], cover.nearest[own])
            nearest = torch.minimum(in_block, nearest_distances(queries, refill)) if len(refill) else in_block
            others = (slice(None, cover.rows.start), slice(cover.rows.stop, None))
            banks, norms = [self.memory_bank[s] for s in others], [bank_norms[s] for s in others]
            farthest = largest_nearest_distances(queries, nearest, banks, norms, self.score_top_k)
            winners.append(queries[farthest])
            refills.append(refill)
        if winners:  # measured as a test image's score is: |q - b| for the row the expansion finds nearest
            k = len(winners[0])
            owners = images.repeat_interleave(k)
            distances = self._left_out_distances(torch.cat(winners), owners, refills, bank_owner, bank_norms, k)
            return distances.view(-1, k).mean(1)
        return torch.cat(scores) if scores else features.new_empty(0, dtype=torch.float32)

    def _left_out_distances(
        self, winners: Tensor, images: Tensor, refills: list[Tensor], bank_owner: Tensor, bank_norms: Tensor, k: int
    ) -> Tensor:
        """Distances (n,) of the farthest patches (`winners`, (n, D), `k` an image, of `images` (n,)) to the nearest
        row of the bank without their image's own rows and with its refill (`refills`, one an image), as
        `_farthest_distances` measures a test image: the row the expansion finds nearest, then |q - b|.
        Calibration and test then round alike."""
        squared = torch.addmm(bank_norms, winners, self.memory_bank.T, alpha=-2.0)
        squared.masked_fill_(bank_owner[None, :] == images.to(bank_owner.device)[:, None], float("inf"))
        nearest, rows = squared.min(dim=1)
        chosen = self.memory_bank[rows]
        for i in range(len(winners)):
            refill = refills[i // k]
            if len(refill):
                in_refill = (refill * refill).sum(1) - 2 * refill @ winners[i]
                j = in_refill.argmin()
                if in_refill[j] < nearest[i]:
                    chosen[i] = refill[j]
        return torch.linalg.vector_norm(winners - chosen, dim=1)

    def _block_cover(
        self, patches: Tensor, bank_owner: Tensor, bank_norms: Tensor, block: range, per_image: int, chunk: int = 2048
    ) -> BlockCover:
        """How the bank rows of `block` cover its patches, in one pass over block patches x block bank rows,
        in fixed-shape chunks; `bank_norms`: the bank's squared row norms."""
        first, stop = torch.searchsorted(bank_owner, bank_owner.new_tensor([block.start, block.stop])).tolist()
        bank, owners = self.memory_bank[first:stop], bank_owner[first:stop]  # the bank is in image order
        block_patches = patches[block.start * per_image : block.stop * per_image]
        bank_norms, n = bank_norms[first:stop], len(block_patches)
        padded = F.pad(block_patches, (0, 0, 0, -n % chunk))
        nearest, nearest_owner, uncovered = [], [], []
        for start in range(0, len(padded), chunk):
            q = padded[start : start + chunk].float()
            squared = torch.addmm(bank_norms, q, bank.T, alpha=-2.0).add_((q * q).sum(1, keepdim=True))
            value, index = squared.min(1)
            nearest.append(value)
            nearest_owner.append(owners[index])
            uncovered.append(squared.masked_fill_(owners == nearest_owner[-1][:, None], float("inf")).amin(1))
        return BlockCover(
            images=block,
            patches=block_patches,
            image_of=torch.arange(block.start, block.stop, device=patches.device).repeat_interleave(per_image),
            nearest=torch.cat(nearest)[:n].clamp_min(0).sqrt(),
            nearest_owner=torch.cat(nearest_owner)[:n],
            uncovered=torch.cat(uncovered)[:n].clamp_min(0).sqrt(),
            rows=range(first, stop),
        )

    def cross_fit_scores(self, features: Tensor, folds: Tensor, fold: int, images: Tensor, chunk: int = 16) -> Tensor:
        """Scores of `images` (indices into `features`, all in `fold`) against a memory bank built, as `fit`
        builds it, from the other folds."""
        if not len(images):
            return features.new_empty(0, dtype=torch.float32)
        patches = features.shape[1] * features.shape[2]
        inside = images
        kept = folds != fold
        outside = features[kept]
        groups = None
        if self.groups is not None:  # each category's images outside the fold, still chosen in blocks of their own
            group_of = torch.repeat_interleave(torch.arange(len(self.groups)), torch.tensor(self.groups))
            groups = [n for n in torch.bincount(group_of[kept.cpu()], minlength=len(self.groups)).tolist() if n]
        bank = outside.flatten(0, 2).index_select(0, self.select(outside, groups)).float()
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
