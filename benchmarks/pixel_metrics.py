"""Pixel AUROC + AUPRO over 127 images at 256 x 256: one shared sort against the previous implementation.

    python benchmarks/pixel_metrics.py [--images 127] [--size 256] [--repeats 3]

The previous implementation (lit-anomaly 0.1) is kept here as the reference: dense ranks through
torch.unique, torchmetrics' binary_auroc (its own sort), then a stable float64 argsort for AUPRO.
Prints median seconds of each, the speed-up, and the largest difference in the values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from lit_anomaly.metrics import pixel_auroc_and_aupro
from lit_anomaly.metrics.aupro import label_regions


def previous_pixel_auroc(maps: torch.Tensor, masks: torch.Tensor) -> float:
    unique, inverse = torch.unique(maps.flatten(), return_inverse=True)
    return float(binary_auroc(inverse.double() / max(1, len(unique) - 1), masks.flatten().long()))


def previous_aupro(maps: torch.Tensor, masks: torch.Tensor, limit: float = 0.3) -> float:
    regions, n_regions = label_regions(masks)
    flat = regions.ravel()
    negatives = flat == 0
    sizes = np.bincount(flat, minlength=n_regions + 1).astype(np.float64)
    pro_weights = np.where(negatives, 0.0, 1.0 / (n_regions * sizes[flat]))
    fpr_weights = negatives / max(1, negatives.sum())
    scores = maps.double().cpu().numpy().ravel()
    order = np.argsort(-scores, kind="stable")
    fpr, pro = np.cumsum(fpr_weights[order]), np.minimum(np.cumsum(pro_weights[order]), 1.0)
    sorted_scores = scores[order]
    run_ends = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr, pro = np.concatenate([[0.0], fpr[run_ends]]), np.concatenate([[0.0], pro[run_ends]])
    inside = fpr <= limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < limit and inside.sum() < len(fpr):
        j = inside.sum()
        y_at = pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x, y = np.append(x, limit), np.append(y, y_at)
    return float(np.trapezoid(y, x) / limit)


def synthetic_maps(images: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random maps (float32, like a detector's) and blob masks on 100 of every 127 images."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(images, 1, size // 8, size // 8, generator=generator)
    maps = torch.nn.functional.interpolate(noise, (size, size), mode="bilinear")[:, 0]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(images, size, size, dtype=torch.bool)
    for i in range(images * 100 // 127):
        cy, cx, r = [*torch.randint(20, size - 20, (2,), generator=generator).tolist(), 8 + i % 12]
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    return maps + 0.5 * masks, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=127)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    maps, masks = synthetic_maps(args.images, args.size)
    times: dict[str, list[float]] = {"previous": [], "one_sort": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        previous = (previous_pixel_auroc(maps, masks), previous_aupro(maps, masks))
        times["previous"].append(time.perf_counter() - started)
        started = time.perf_counter()
        current = pixel_auroc_and_aupro(maps, masks)
        times["one_sort"].append(time.perf_counter() - started)
    before, after = (statistics.median(times[k]) for k in ("previous", "one_sort"))
    print(json.dumps({
        "pixels": maps.numel(), "previous_s": round(before, 3), "one_sort_s": round(after, 3),
        "speedup": round(before / after, 2), "pixel_auroc": current[0], "pixel_aupro": current[1],
        "auroc_difference": abs(current[0] - previous[0]), "aupro_difference": abs(current[1] - previous[1]),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
