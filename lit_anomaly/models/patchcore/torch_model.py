"""PatchCore (Roth et al., 2022) as a pure nn.Module: locally aware patch features, a coreset memory bank."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from ..components import FeatureExtractor, greedy_coreset, nearest_neighbors


def blur_kernel_size(sigma: float) -> int:
    return 2 * int(4.0 * sigma + 0.5) + 1


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

    def fit(self, patches: Tensor) -> None:
        """Build the memory bank from all training patch features (N, D)."""
        n_select = max(1, round(self.coreset_ratio * len(patches)))
        if self.coreset_ratio >= 1.0:
            self.memory_bank = patches.float().contiguous()
            return
        chosen = greedy_coreset(patches, n_select, self.projection_dim, self.seed)
        self.memory_bank = patches.index_select(0, chosen).float().contiguous()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        embedding = self.embed(images)
        batch, _, height, width = embedding.shape
        queries = self.flatten(embedding)
        distances, indices = nearest_neighbors(queries, self.memory_bank, k=1)
        patch_scores = distances[:, 0].view(batch, height * width)
        scores, best = patch_scores.max(dim=1)
        if self.reweight and len(self.memory_bank) > 1:
            rows = torch.arange(batch, device=images.device) * height * width + best
            scores = self._reweighted(queries[rows], indices[rows, 0], scores)
        maps = F.interpolate(patch_scores.view(batch, 1, height, width), images.shape[-2:], mode="bilinear")
        if self.blur_sigma > 0:
            maps = gaussian_blur(maps, [blur_kernel_size(self.blur_sigma)] * 2, [self.blur_sigma] * 2)
        return {"score": scores, "anomaly_map": maps}

    def _reweighted(self, query: Tensor, nearest: Tensor, scores: Tensor) -> Tensor:
        """Paper eq. 7: damp the score when the nearest bank patch sits in a dense neighbourhood."""
        k = min(self.num_neighbors, len(self.memory_bank))
        _, neighbourhood = nearest_neighbors(self.memory_bank[nearest], self.memory_bank, k=k)
        distances = torch.linalg.vector_norm(query[:, None] - self.memory_bank[neighbourhood], dim=-1)
        weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weights * scores
