"""Exact k-nearest-neighbour search in fixed-size chunks: bounded memory, batch-independent results."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nearest_neighbors(
    queries: Tensor,
    bank: Tensor,
    k: int = 1,
    max_elements: int = 2**26,
    query_groups: Tensor | None = None,
    bank_groups: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Euclidean distances (Q, k) and indices (Q, k) of the `k` nearest rows of `bank` for every query.

    With `query_groups` (Q,) and `bank_groups` (M,), a query never matches a bank row of its own group
    (leave-one-image-out scoring); a query with no other row gets distance inf.

    Every matrix product has the same shape (the last chunk is zero-padded): BLAS blocking depends
    on shape, so a query's distances never depend on how many other queries came with it.
    """
    bank = bank.to(queries.dtype)
    bank_norms = (bank * bank).sum(1)
    chunk = 1 << max(6, min(14, (max_elements // max(1, len(bank))).bit_length() - 1))
    n = len(queries)
    padded = F.pad(queries, (0, 0, 0, -n % chunk))
    if query_groups is not None:
        query_groups = F.pad(query_groups, (0, -n % chunk), value=-1)
    distances, indices = [], []
    for start in range(0, len(padded), chunk):
        q = padded[start : start + chunk]
        squared = torch.addmm(bank_norms, q, bank.T, alpha=-2.0).add_((q * q).sum(1, keepdim=True))
        if query_groups is not None:
            own = query_groups[start : start + chunk, None] == bank_groups[None, :]
            squared.masked_fill_(own, float("inf"))
        top = squared.topk(k, dim=1, largest=False) if k > 1 else squared.min(dim=1, keepdim=True)
        distances.append(top[0].clamp_min_(0).sqrt_())
        indices.append(top[1])
    return torch.cat(distances)[:n], torch.cat(indices)[:n]
