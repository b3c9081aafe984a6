"""Greedy k-center coreset selection (PatchCore, Sener & Savarese 2018) on a random projection."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def random_projection(features: Tensor, dim: int | None, seed: int = 0, chunk: int = 65536) -> Tensor:
    """Gaussian (Johnson-Lindenstrauss) projection to `dim` channels, in float32; identity when it would not shrink."""
    if dim is None or dim >= features.shape[1]:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator).div_(math.sqrt(dim)).to(features.device)
    return torch.cat([features[i : i + chunk].float() @ matrix for i in range(0, len(features), chunk)])


def greedy_coreset(features: Tensor, n_select: int, projection_dim: int | None = 128, seed: int = 0) -> Tensor:
    """Indices of `n_select` rows chosen by greedy k-center selection.

    The whole loop stays on the features' device with no host synchronisation: each step is one
    matrix-vector product, an elementwise minimum and an argmax.
    """
    n = features.shape[0]
    n_select = min(max(1, n_select), n)
    x = random_projection(features, projection_dim, seed)
    squared_norms = (x * x).sum(1)
    generator = torch.Generator().manual_seed(seed)
    current = torch.randint(n, (1,), generator=generator).to(x.device)
    min_distances = torch.full((n,), float("inf"), device=x.device)
    selected = torch.empty(n_select, dtype=torch.long, device=x.device)
    distances = torch.empty(n, device=x.device)
    for i in range(n_select):
        selected[i : i + 1] = current
        centre = x.index_select(0, current).squeeze(0)
        torch.addmv(squared_norms, x, centre, alpha=-2.0, out=distances)  # |x|^2 - 2 x.c
        distances.add_(squared_norms.index_select(0, current))  # + |c|^2
        torch.minimum(min_distances, distances, out=min_distances)
        current = min_distances.argmax().view(1)
    return selected
