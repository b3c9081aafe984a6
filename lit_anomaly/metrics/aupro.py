"""AUPRO (MVTec AD) and AU-sPRO (MVTec LOCO), exact, from one sort of all pixel scores.

At every threshold t, FPR(t) is the share of defect-free pixels with score >= t and PRO(t) the
mean, over ground-truth regions, of the share of the region's pixels with score >= t. Both are
sums of per-pixel weights over the pixels scoring >= t, so one descending sort and two cumulative
sums give the whole curve; it is read at the last pixel of every run of tied scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from torch import Tensor

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_regions(masks: Tensor) -> tuple[np.ndarray, int]:
    """8-connected components of every mask, numbered 1..R across all images (0 = defect-free)."""
    labels = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for i, mask in enumerate(masks.bool().cpu().numpy()):
        regions, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
        labels[i] = np.where(regions > 0, regions + count, 0)
        count += n
    return labels, count


def _area_under_curve(scores: np.ndarray, fpr_weights: np.ndarray, pro_weights: np.ndarray, limit: float) -> float:
    order = np.argsort(-scores, kind="stable")
    fpr = np.cumsum(fpr_weights[order])
    pro = np.minimum(np.cumsum(pro_weights[order]), 1.0)  # a sum of shares: rounding must not pass 1
    sorted_scores = scores[order]
    run_ends = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = np.concatenate([[0.0], fpr[run_ends]])
    pro = np.concatenate([[0.0], pro[run_ends]])
    inside = fpr <= limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < limit and inside.sum() < len(fpr):  # interpolate PRO at exactly the limit
        j = inside.sum()
        y_at = pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x, y = np.append(x, limit), np.append(y, y_at)
    return float(np.trapezoid(y, x) / limit)


def aupro(maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit`; maps and masks are (N, H, W)."""
    regions, n_regions = label_regions(masks)
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one ground-truth region")
    flat_regions = regions.ravel()
    negatives = flat_regions == 0
    sizes = np.bincount(flat_regions, minlength=n_regions + 1).astype(np.float64)
    pro_weights = np.where(negatives, 0.0, 1.0 / (n_regions * sizes[flat_regions]))
    fpr_weights = negatives / max(1, negatives.sum())
    return _area_under_curve(maps.double().cpu().numpy().ravel(), fpr_weights, pro_weights, fpr_limit)


def au_spro(
    maps: Tensor,
    defects: Sequence[tuple[int, Tensor, float]],
    good_images: Sequence[int],
    fpr_limit: float = 0.05,
) -> float:
    """Area under the sPRO curve (MVTec LOCO) up to `fpr_limit`, normalised.

    `defects` holds (image position, defect mask, saturation area); the per-defect overlap is
    min(TP area / saturation area, 1). As in the official evaluation, FPR is measured on the
    anomaly-free images `good_images` only.
    """
    if not defects:
        raise ValueError("sPRO needs at least one annotated defect")
    height, width = maps.shape[-2:]
    scores = [maps[list(good_images)].double().cpu().numpy().ravel()]
    fpr_weights = [np.full(scores[0].shape, 1.0 / max(1, scores[0].size))]
    pro_weights = []
    for image, mask, saturation in defects:
        pixels = maps[image].double().cpu().numpy()[mask.bool().cpu().numpy().reshape(height, width)]
        saturation = max(1.0, float(saturation))
        # A defect's overlap saturates: only its `saturation` highest-scoring pixels count.
        rank = np.empty(len(pixels), dtype=np.int64)
        rank[np.argsort(-pixels, kind="stable")] = np.arange(len(pixels))
        scores.append(pixels)
        fpr_weights.append(np.zeros(len(pixels)))
        pro_weights.append((rank < saturation) / (saturation * len(defects)))
    pro = np.concatenate([np.zeros(scores[0].size), *pro_weights])
    return _area_under_curve(np.concatenate(scores), np.concatenate(fpr_weights), pro, fpr_limit)
