"""Exact k-nearest-neighbour search in chunks, so memory stays bounded for any query count."""

from __future__ import annotations

import torch
from torch import Tensor


def nearest_neighbors(queries: Tensor, bank: Tensor, k: int = 1, max_elements: int = 2**26) -> tuple[Tensor, Tensor]:
    """Euclidean distances (Q, k) and indices (Q, k) of the `k` nearest rows of `bank` for every query."""
    bank = bank.to(queries.dtype)
    bank_norms = (bank * bank).sum(1)
    chunk = max(1, max_elements // max(1, len(bank)))
    distances, indices = [], []
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        squared = torch.addmm(bank_norms, q, bank.T, alpha=-2.0).add_((q * q).sum(1, keepdim=True))
        top = squared.topk(k, dim=1, largest=False) if k > 1 else squared.min(dim=1, keepdim=True)
        distances.append(top[0].clamp_min_(0).sqrt_())
        indices.append(top[1])
    return torch.cat(distances), torch.cat(indices)
