"""Greedy k-center coreset selection (PatchCore, Sener & Savarese 2018) on a random projection."""

from __future__ import annotations

import itertools
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


def image_blocks(n_images: int, rows_per_image: int, block_rows: int | None) -> list[range]:
    """Consecutive groups of whole images, of near-equal size and about `block_rows` patch rows at most (never
    less than one image); one group when `block_rows` is None.

    Greedy k-center costs rows x centres, so over one block per group a coreset of a fixed ratio costs time
    linear in the train set instead of quadratic; a group is also what a leave-one-out refit has to redo.
    """
    count = 1 if block_rows is None else max(1, min(n_images, math.ceil(n_images * rows_per_image / block_rows)))
    bounds = [round(i * n_images / count) for i in range(count + 1)]
    return [range(start, stop) for start, stop in itertools.pairwise(bounds)]


def greedy_coreset(features: Tensor, n_select: int, projection_dim: int | None = 128, seed: int = 0) -> Tensor:
    """Indices of `n_select` rows chosen by greedy k-center selection (each step takes the farthest row).

    On an accelerator the loop is dense and never synchronises with the host; on the CPU it skips,
    by the triangle inequality, every row the new centre cannot move, which is exact and several
    times faster once the centres cover the data.
    """
    n = features.shape[0]
    n_select = min(max(1, n_select), n)
    x = random_projection(features, projection_dim, seed)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    if x.device.type == "cpu":
        return _greedy_pruned(x, n_select, start)
    return _greedy_dense(x, n_select, start)


def _greedy_dense(x: Tensor, n_select: int, start: int) -> Tensor:
    """Every step: one matrix-vector product, a minimum and an argmax, all on the device."""
    squared_norms = (x * x).sum(1)
    current = torch.tensor([start], device=x.device)
    min_distances = torch.full((len(x),), float("inf"), device=x.device)
    distances = torch.empty(len(x), device=x.device)
    selected = torch.empty(n_select, dtype=torch.long, device=x.device)
    for i in range(n_select):
        selected[i : i + 1] = current
        centre = x.index_select(0, current).squeeze(0)
        torch.addmv(squared_norms, x, centre, alpha=-2.0, out=distances)  # |x|^2 - 2 x.c
        distances.add_(squared_norms.index_select(0, current))  # + |c|^2
        torch.minimum(min_distances, distances, out=min_distances)
        current = min_distances.argmax().view(1)
    return selected


def _greedy_pruned(x: Tensor, n_select: int, start: int) -> Tensor:
    """The same selection, computing distances only for rows the new centre might be closer to.

    A row x assigned to centre a can move to the new centre c only if |c - a| < 2 |x - a|
    (triangle inequality); in squared terms d(a, c) < 4 d(x, a). A small margin keeps rounding
    from pruning a row the dense loop would update.
    """
    n, dim = x.shape
    squared_norms = (x * x).sum(1)
    centres = torch.empty(n_select, dim)
    centre_norms = torch.empty(n_select)
    assignment = torch.zeros(n, dtype=torch.int32)
    min_distances = torch.full((n,), float("inf"))
    bounds = torch.full((n,), float("inf"))  # 4 d(x, a) with the margin, kept in step with min_distances
    selected = torch.empty(n_select, dtype=torch.long)
    current = start
    for i in range(n_select):
        selected[i] = current
        centre = x[current]
        centres[i], centre_norms[i] = centre, squared_norms[current]
        rows = None
        if i > 0:
            to_centres = torch.addmv(centre_norms[:i], centres[:i], centre, alpha=-2.0).add_(centre_norms[i])
            rows = torch.nonzero(to_centres.index_select(0, assignment) < bounds).squeeze(1)
            if len(rows) > n // 3:  # little to skip: a dense pass is cheaper than gathering rows
                rows = None
        if rows is None:
            distances = torch.addmv(squared_norms, x, centre, alpha=-2.0).add_(centre_norms[i])
            closer = distances < min_distances
            min_distances = torch.where(closer, distances, min_distances)
            bounds = min_distances * 4.004 + 1e-6
            assignment[closer] = i
        else:
            distances = torch.addmv(squared_norms[rows], x[rows], centre, alpha=-2.0).add_(centre_norms[i])
            closer = distances < min_distances[rows]
            moved, captured = rows[closer], distances[closer]
            min_distances[moved] = captured
            bounds[moved] = captured * 4.004 + 1e-6
            assignment[moved] = i
        current = int(min_distances.argmax())
    return selected


def farthest_first(points: Tensor, distances: Tensor, count: int) -> Tensor:
    """Indices of up to `count` rows of `points` chosen greedily, farthest first, given each row's distance to
    the centres already chosen: greedy k-center continued from an existing set of centres."""
    distances = distances.clone()
    chosen = []
    for _ in range(min(count, len(points))):
        chosen.append(int(distances.argmax()))
        distances = torch.minimum(distances, torch.linalg.vector_norm(points - points[chosen[-1]], dim=1))
    return torch.tensor(chosen, dtype=torch.long, device=points.device)
