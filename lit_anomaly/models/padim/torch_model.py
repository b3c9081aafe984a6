"""PaDiM (Defard et al., 2021) as a pure nn.Module: one Gaussian per feature position."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from ..components import FeatureExtractor
from ..patchcore.torch_model import blur_kernel_size


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
    ) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, layers, pretrained, weights_path)
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

    def fit(self, total: Tensor, outer: Tensor, count: int, chunk: int = 1024) -> None:
        """Gaussians from summed statistics of `count` images; covariance regularised by eps * I.

        Works in place on `outer` and inverts in chunks of positions, so the float64 statistics are
        never copied whole.
        """
        if count < 2:
            raise ValueError(f"PaDiM needs at least 2 training images, got {count}")
        mean = total / count
        covariance = outer.baddbmm_(mean[:, :, None], mean[:, None, :], alpha=-count).div_(count - 1)
        covariance.diagonal(dim1=1, dim2=2).add_(self.covariance_eps)
        self.mean = mean.T.float().contiguous()  # (d, P)
        self.inverse_covariance = torch.cat(
            [torch.linalg.inv(covariance[i : i + chunk]).float() for i in range(0, len(covariance), chunk)]
        )

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        embedding = self.embed(images)
        batch, _, height, width = embedding.shape
        delta = (embedding.flatten(2) - self.mean).permute(2, 0, 1)  # (P, B, d)
        squared = (torch.bmm(delta, self.inverse_covariance) * delta).sum(-1)  # (P, B)
        distances = squared.clamp_min(0).sqrt().T.reshape(batch, 1, height, width)
        maps = F.interpolate(distances, images.shape[-2:], mode="bilinear")
        if self.blur_sigma > 0:
            maps = gaussian_blur(maps, [blur_kernel_size(self.blur_sigma)] * 2, [self.blur_sigma] * 2)
        return {"score": maps.flatten(1).amax(1), "anomaly_map": maps}
