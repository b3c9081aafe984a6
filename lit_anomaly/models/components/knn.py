"""Exact k-nearest-neighbour search in fixed-size chunks: bounded memory, batch-independent results."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .graph import exporting


def nearest_neighbors(
    queries: Tensor, bank: Tensor, k: int = 1, max_elements: int = 2**26, tile: tuple[int, int] = (512, 1024)
) -> tuple[Tensor, Tensor]:
    """Euclidean distances (Q, k) and indices (Q, k) of the `k` nearest rows of `bank` for every query.

    Every matrix product has the same shape (the last chunk is zero-padded): BLAS blocking depends
    on shape, so a query's distances never depend on how many other queries came with it. The nearest
    neighbour alone (k = 1, every score) is reduced tile by tile, `tile` = (queries, bank rows), so the
    distances never leave the cache: the full distance matrix would be written to memory and read back,
    which costs more than the products. 512 queries a tile balance cache reuse against padding a short batch
    (docs/PERFORMANCE.md has the measurement).
    """
    bank = bank.to(queries.dtype)
    bank_norms = (bank * bank).sum(1)
    if exporting():  # one product for the whole batch: a graph has no loops to tile with
        squared, indices = torch.addmm(bank_norms, queries, bank.T, alpha=-2.0).topk(k, dim=1, largest=False)
        return squared.add((queries * queries).sum(1, keepdim=True)).clamp_min(0).sqrt(), indices
    n = len(queries)
    chunk = tile[0] if k == 1 else 1 << max(6, min(14, (max_elements // max(1, len(bank))).bit_length() - 1))
    padded = F.pad(queries, (0, 0, 0, -n % chunk))
    distances, indices = [], []
    for start in range(0, len(padded), chunk):
        q = padded[start : start + chunk]
        if k == 1:
            squared, nearest = _nearest_tiled(q, bank, bank_norms, tile[1])
        else:
            squared, nearest = torch.addmm(bank_norms, q, bank.T, alpha=-2.0).topk(k, dim=1, largest=False)
        distances.append(squared.add_((q * q).sum(1, keepdim=True)).clamp_min_(0).sqrt_())
        indices.append(nearest)
    return torch.cat(distances)[:n], torch.cat(indices)[:n]


def _nearest_tiled(
    q: Tensor, bank: Tensor, bank_norms: Tensor, rows: int, with_index: bool = True
) -> tuple[Tensor, Tensor | None]:
    """|b|^2 - 2 q.b (Q, 1) for the nearest bank row of each query, and its index unless `with_index` is
    false (tracking it costs a third of the time), `rows` bank rows at a time."""
    best = torch.full((len(q), 1), float("inf"), dtype=q.dtype, device=q.device)
    where = torch.zeros((len(q), 1), dtype=torch.long, device=q.device) if with_index else None
    for start in range(0, len(bank), rows):
        partial = torch.addmm(bank_norms[start : start + rows], q, bank[start : start + rows].T, alpha=-2.0)
        if where is None:
            torch.minimum(best, partial.amin(1, keepdim=True), out=best)
            continue
        value, index = partial.min(dim=1, keepdim=True)
        closer = value < best
        best = torch.where(closer, value, best)
        where = torch.where(closer, index + start, where)
    return best, where


def nearest_distances(
    queries: Tensor, bank: Tensor, tile: tuple[int, int] = (512, 1024), bank_norms: Tensor | None = None
) -> Tensor:
    """Euclidean distance (Q,) of every query to its nearest bank row: `nearest_neighbors` with k = 1, without
    the indices that only the reweighting needs. `bank_norms`: the bank's squared row norms, if already known."""
    bank = bank.to(queries.dtype)
    bank_norms = (bank * bank).sum(1) if bank_norms is None else bank_norms
    if exporting():  # one product for the whole batch: a graph has no loops to tile with
        squared = torch.addmm(bank_norms, queries, bank.T, alpha=-2.0).amin(1)
        return squared.add((queries * queries).sum(1)).clamp_min(0).sqrt()
    n = len(queries)
    padded = F.pad(queries, (0, 0, 0, -n % tile[0]))
    distances = []
    for start in range(0, len(padded), tile[0]):
        q = padded[start : start + tile[0]]
        squared, _ = _nearest_tiled(q, bank, bank_norms, tile[1], with_index=False)
        distances.append(squared.add_((q * q).sum(1, keepdim=True)).clamp_min_(0).sqrt_()[:, 0])
    return torch.cat(distances)[:n]


def largest_nearest_distances(
    queries: Tensor, bounds: Tensor, banks: Sequence[Tensor], bank_norms: Sequence[Tensor], k: int = 1, chunk: int = 256
) -> Tensor:
    """Indices (k,) of the `k` queries with the largest min(bound, distance to the nearest row of `banks`),
    largest first. `banks` are parts of one bank (views, not copied) and `bank_norms` their squared row norms.

    Queries are searched in descending order of their `bounds`, and only while a bound exceeds the k-th largest
    distance found: a query's distance is at most its bound, so one with a lower bound cannot enter the top k.
    The result is exact; with bounds near the distances, a small share of the queries is searched.
    """
    k = min(k, len(queries))
    parts = [(bank, norms) for bank, norms in zip(banks, bank_norms, strict=True) if len(bank)]
    if not parts:
        return bounds.topk(k).indices
    order = bounds.argsort(descending=True)
    found, where = bounds.new_empty(0), order[:0]
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        if len(found) == k and bounds[rows[0]] <= found[-1]:
            break
        nearest = bounds[rows]
        for bank, norms in parts:
            nearest = torch.minimum(nearest, nearest_distances(queries[rows], bank, (chunk, 1024), norms))
        found, best = torch.cat([found, nearest]).topk(min(k, len(found) + len(rows)))
        where = torch.cat([where, rows])[best]
    return where
