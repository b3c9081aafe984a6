"""PaDiM (Defard et al., 2021) as a pure nn.Module: one Gaussian per feature position."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import FeatureExtractor, smooth


class PaDiMModel(nn.Module):
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
        score_top_k: int = 1,
        tile_size: int | None = None,
        tile_overlap: int = 0,
    ) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained, weights_path, tile_size=tile_size, tile_overlap=tile_overlap
        )
        self.score_top_k = score_top_k
        total = sum(self.extractor.channels)
        n_features = min(n_features, total)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("channel_index", torch.randperm(total, generator=generator)[:n_features].sort()[0])
        self.register_buffer("mean", torch.empty(n_features, 0))
        self.register_buffer("inverse_covariance", torch.empty(0, n_features, n_features))
        self.covariance_eps = covariance_eps
        self.blur_sigma = blur_sigma

    def embed(self, images: Tensor) -> Tensor:
        """(B, d, h, w): the chosen stages at the first stage's resolution, random channel subset."""
        features = self.extractor(images)
        size = features[0].shape[-2:]
        features = [f if f.shape[-2:] == size else F.interpolate(f, size, mode="nearest") for f in features]
        return torch.cat(features, dim=1).index_select(1, self.channel_index)

    @staticmethod
    def accumulate(embedding: Tensor, total: Tensor | None, outer: Tensor | None) -> tuple[Tensor, Tensor]:
        """Add a batch's sufficient statistics, in float64 and in place: sum (P, d) and sum of x x^T (P, d, d)."""
        x = embedding.flatten(2).permute(2, 0, 1).double()  # (P, B, d)
        if total is None:
            return x.sum(1), torch.bmm(x.transpose(1, 2), x)
        total += x.sum(1)
        return total, outer.baddbmm_(x.transpose(1, 2), x)

    def fit(self, total: Tensor, outer: Tensor, count: int) -> Tensor:
        """Gaussians from summed statistics of `count` images; returns the regularised covariance (P, d, d),
        float64, computed in place of `outer` so the statistics are never copied whole."""
        mean, self.inverse_covariance, covariance = gaussian(total, outer, count, self.covariance_eps, in_place=True)
        self.mean = mean.T.float().contiguous()  # (d, P)
        return covariance

    def distances(self, embedding: Tensor, mean: Tensor, inverse_covariance: Tensor) -> Tensor:
        """Mahalanobis distance (B, 1, h, w) of every position to its Gaussian (mean (d, P))."""
        batch, _, height, width = embedding.shape
        delta = (embedding.flatten(2) - mean).permute(2, 0, 1)  # (P, B, d)
        squared = (torch.bmm(delta, inverse_covariance) * delta).sum(-1)  # (P, B)
        return squared.clamp_min(0).sqrt().T.reshape(batch, 1, height, width)

    def output(self, distances: Tensor, size: Sequence[int]) -> dict[str, Tensor]:
        """Anomaly maps at the image `size`, smoothed, and image scores (the mean of their `score_top_k` largest
        values: the maximum at 1)."""
        maps = F.interpolate(distances, tuple(size), mode="bilinear")
        maps = smooth(maps, self.blur_sigma)
        flat = maps.flatten(1)
        return {"score": flat.topk(min(self.score_top_k, flat.shape[1])).values.mean(1), "anomaly_map": maps}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        distances = self.distances(self.embed(images), self.mean, self.inverse_covariance)
        return self.output(distances, images.shape[-2:])

    def image_scores(self, distances: Tensor, size: Sequence[int], chunk: int = 32) -> Tensor:
        return torch.cat(
            [self.output(distances[i : i + chunk], size)["score"] for i in range(0, len(distances), chunk)]
        )

    def leave_one_out_scores(
        self, embeddings: Tensor, mean: Tensor, covariance: Tensor, count: int, size: Sequence[int]
    ) -> Tensor:
        """Scores of train images (embeddings (N, d, h, w)) under the Gaussians fitted without each of them.

        With n images, mean m and covariance C, leaving out x (delta = x - m) gives
        (n - 2) C' = (n - 1) C - n / (n - 1) delta delta^T and x - m' = n / (n - 1) delta, so with
        A = (n - 1) / (n - 2) C + eps I and s = delta^T A^-1 delta, Sherman-Morrison gives the squared
        distance (n / (n - 1))^2 s / (1 - n s / ((n - 1)(n - 2))): one Cholesky factor per position, exact.
        `mean` is (P, d) float64 and `covariance` the regularised (P, d, d) one `fit` returns.
        """
        n, eps = count, self.covariance_eps
        a, b, c = (n - 1) / (n - 2), n / ((n - 1) * (n - 2)), n / (n - 1)
        images, dim, height, width = embeddings.shape
        x = embeddings.flatten(2)  # (N, d, P)
        eye = torch.eye(dim, dtype=torch.float64, device=x.device)
        distances = torch.empty(images, height * width, device=x.device)
        step = max(1, 2**24 // max(1, images * dim))
        for start in range(0, height * width, step):
            stop = min(start + step, height * width)
            factor = torch.linalg.cholesky(covariance[start:stop] * a - (a - 1) * eps * eye)  # A = L L^T
            delta = x[:, :, start:stop].permute(2, 1, 0).double() - mean[start:stop, :, None]  # (p, d, N)
            s = torch.linalg.solve_triangular(factor, delta, upper=False).pow_(2).sum(1)  # |L^-1 delta|^2, (p, N)
            squared = (c * c) * s / (1 - b * s).clamp_min(1e-12)
            distances[:, start:stop] = squared.clamp_min(0).sqrt().T.float()
        return self.image_scores(distances.view(images, 1, height, width), size)


def gaussian(
    total: Tensor, outer: Tensor, count: int, eps: float, in_place: bool = False, chunk: int = 1024
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean (P, d) float64, inverse covariance (P, d, d) float32 and covariance + eps I (P, d, d) float64
    from summed statistics of `count` images; inverted in chunks of positions."""
    if count < 2:
        raise ValueError(f"PaDiM needs at least 2 training images, got {count}")
    mean = total / count
    outer = outer if in_place else outer.clone()
    covariance = outer.baddbmm_(mean[:, :, None], mean[:, None, :], alpha=-count).div_(count - 1)
    covariance.diagonal(dim1=1, dim2=2).add_(eps)
    inverse = torch.cat([torch.linalg.inv(covariance[i : i + chunk]).float() for i in range(0, len(covariance), chunk)])
    return mean, inverse, covariance
