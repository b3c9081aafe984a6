"""Greedy k-center coreset selection (PatchCore, Sener & Savarese 2018) on a random projection."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def random_projection(features: Tensor, dim: int | None, seed: int = 0, chunk: int = 65536) -> Tensor:
    """Gaussian (Johnson-Lindenstrauss) projection to `dim` channels, in float32; identity when it would not shrink."""
    if dim is None or dim >= features.shape[1]:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator).div_(math.sqrt(dim)).to(features.device)
    return torch.cat([features[i : i + chunk].float() @ matrix for i in range(0, len(features), chunk)])


def image_blocks(
    n_images: int, rows_per_image: int, block_rows: int | None, groups: Sequence[int] | None = None
) -> list[range]:
    """Consecutive groups of whole images, of near-equal size and at most `block_rows` patch rows each (never
    less than one image); one group when `block_rows` is None. With `groups` (the sizes of consecutive runs of
    images that belong together, such as a unified fit's categories), no block spans two of them.

    Greedy k-center costs rows x centres, so over one block per group a coreset of a fixed ratio costs time
    linear in the train set instead of quadratic; a group is also what a leave-one-out refit has to redo.
    """
    if groups is not None and sum(groups) != n_images:
        raise ValueError(f"groups of {sum(groups)} images for {n_images} images")
    blocks, start = [], 0
    for size in groups or [n_images]:
        per_block = size if block_rows is None else max(1, block_rows // max(1, rows_per_image))
        count = max(1, math.ceil(size / max(1, per_block)))
        bounds = [start + i * size // count for i in range(count + 1)]
        blocks += [range(first, stop) for first, stop in itertools.pairwise(bounds)]
        start += size
    return blocks


def greedy_coreset(features: Tensor, n_select: int, projection_dim: int | None = 128, seed: int = 0) -> Tensor:
    """Indices of `n_select` rows chosen by greedy k-center selection (each step takes the farthest row),
    several centres per pass over the rows (`_greedy_batched`)."""
    n = features.shape[0]
    n_select = min(max(1, n_select), n)
    x = random_projection(features, projection_dim, seed)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    return _greedy_batched(x, n_select, start)


def _greedy_batched(x: Tensor, n_select: int, start: int, batch: int = 256) -> Tensor:
    """The one-centre-per-step selection, several centres per pass over the rows.

    Distances only shrink, so the (batch + 1)-th largest distance bounds every row outside the `batch`
    farthest. Among those candidates, greedy's next pick is the farthest one after the picks so far
    (their mutual distances are a small table, read on the host) as long as it is still at or above the
    bound; the picks stop when it is not, and one matrix product updates all rows with them. Same picks
    as one centre per step (up to rounding ties), with matrix products instead of a matrix-vector product
    per centre: on the CPU that is the arithmetic, on a GPU the kernel launches of one step per centre.
    """
    n = len(x)
    squared_norms = (x * x).sum(1)

    def squared_distances(rows: Tensor | None, centres: Tensor) -> Tensor:
        """Squared distances of `rows` (None: all, without gathering a copy of x) to `centres`."""
        points, norms = (x, squared_norms) if rows is None else (x[rows], squared_norms[rows])
        products = torch.addmm(norms[:, None], points, x[centres].T, alpha=-2.0)
        return products.add_(squared_norms[centres][None]).clamp_min_(0)

    first = torch.tensor([start], device=x.device)
    min_distances = squared_distances(None, first)[:, 0]
    selected = [first]
    chosen = 1
    while chosen < n_select:
        values, candidates = min_distances.topk(min(batch + 1, n))
        values = values.cpu().numpy()
        bound = float(values[batch]) if len(values) > batch else -1.0
        candidates, values = candidates[:batch], values[:batch].copy()
        pairwise = squared_distances(candidates, candidates).cpu().numpy()
        picks = []
        while chosen + len(picks) < n_select:
            best = int(values.argmax())
            if values[best] < bound:
                break
            picks.append(best)
            np.minimum(values, pairwise[best], out=values)
            values[best] = -np.inf
        picked = candidates[picks]
        selected.append(picked)
        chosen += len(picks)
        torch.minimum(min_distances, squared_distances(None, picked).amin(1), out=min_distances)
    return torch.cat(selected)


def farthest_first(points: Tensor, distances: Tensor, count: int) -> Tensor:
    """Indices of up to `count` rows of `points` chosen greedily, farthest first, given each row's distance to
    the centres already chosen: greedy k-center continued from an existing set of centres."""
    distances = distances.clone()
    chosen = []
    for _ in range(min(count, len(points))):
        chosen.append(int(distances.argmax()))
        distances = torch.minimum(distances, torch.linalg.vector_norm(points - points[chosen[-1]], dim=1))
    return torch.tensor(chosen, dtype=torch.long, device=points.device)
