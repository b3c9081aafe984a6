"""Pixel AUROC, AP, F1-max and AUPRO (MVTec AD), and AU-sPRO (MVTec LOCO), exact, from one sort of all pixel
scores.

At every threshold t, FPR(t) is the share of defect-free pixels with score >= t and PRO(t) the
mean, over ground-truth regions, of the share of the region's pixels with score >= t. Both are
sums of per-pixel weights over the pixels scoring >= t, so one descending sort and two cumulative
sums give the whole curve; it is read at the last pixel of every run of tied scores. The true and false
positives counted on the way give the ROC and precision-recall curves, so AUROC, AP and F1-max come from the
same sort.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_regions(masks: Tensor) -> tuple[np.ndarray, int]:
    """8-connected components of every mask, numbered 1..R across all images (0 = defect-free), as uint32."""
    from scipy import ndimage  # imported when first needed: it is slow to import

    labels = np.zeros(masks.shape, dtype=np.uint32)
    count = 0
    for i, mask in enumerate(masks.bool().cpu().numpy()):
        regions, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
        labels[i] = np.where(regions > 0, regions + count, 0)
        count += n
    return labels, count


def _float32_keys(scores: np.ndarray) -> np.ndarray:
    """uint64 keys whose upper 32 bits order as the float32 `scores` do (-0.0 as 0.0); the lower 32 are zero."""
    bits = (scores + np.float32(0.0)).view(np.uint32)  # -0.0 becomes 0.0: equal scores, equal bits
    flip = bits >> np.uint32(31)  # negative scores flip every bit, the others only the sign bit
    flip *= np.uint32(0x7FFFFFFF)
    flip |= np.uint32(0x80000000)
    flip ^= bits
    keys = flip.astype(np.uint64)
    keys <<= np.uint64(32)
    return keys


def _sort_descending(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort `_float32_keys` that carry a payload in their lower 32 bits: the payloads in descending order of
    the scores (as int64), and the mask of the last position of every run of tied scores. numpy sorts
    integers with SIMD, several times faster than it argsorts floats."""
    keys.sort()
    keys = keys[::-1]
    payload = (keys & np.uint64(2**32 - 1)).view(np.int64)
    keys >>= np.uint64(32)
    return payload, np.append(keys[1:] != keys[:-1], True)


def _descending(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Descending order of `scores` and the mask of the last position of every run of tied scores.

    Ties are read only at run ends, so the order among tied scores is free: float32 scores sort as one
    uint64 per pixel, the score's key above the pixel's position."""
    if scores.dtype != np.float32 or len(scores) > 2**32:
        order = np.argsort(-scores)
        sorted_scores = scores[order]
        return order, np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    keys = _float32_keys(scores)
    keys |= np.arange(len(scores), dtype=np.uint64)
    return _sort_descending(keys)


def _labels_descending(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The uint32 `labels` of the pixels in descending order of `scores`, and the run ends of tied scores.

    With float32 scores the label rides in the sort key in place of the pixel's position: AUPRO needs
    only each sorted pixel's region, so there is no order to gather through (a random read per pixel)."""
    if scores.dtype != np.float32:
        order, run_ends = _descending(scores)
        return labels[order].astype(np.int64), run_ends
    keys = _float32_keys(scores)
    keys |= labels
    return _sort_descending(keys)


def _area_under_curve(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Normalised area under (fpr, pro), read at run ends, up to `limit` (PRO interpolated at the limit)."""
    fpr, pro = np.concatenate([[0.0], fpr]), np.concatenate([[0.0], np.minimum(pro, 1.0)])  # shares: cap rounding
    inside = fpr <= limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < limit and inside.sum() < len(fpr):
        j = inside.sum()
        y_at = pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x, y = np.append(x, limit), np.append(y, y_at)
    return float(np.trapezoid(y, x) / limit)


def _curves(maps: Tensor, masks: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From one sort of all pixels, at every distinct threshold (descending): true positives, false positives
    (counts) and PRO as AUPRO defines it (the mean overlap over regions; FPR is over defect-free pixels)."""
    regions, n_regions = label_regions(masks)
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one ground-truth region")
    region_of, run_ends = _labels_descending(maps.cpu().numpy().ravel(), regions.ravel())
    sizes = np.bincount(region_of, minlength=n_regions + 1).astype(np.float64)
    share = np.divide(1.0, n_regions * sizes, out=np.zeros_like(sizes), where=sizes > 0)
    share[0] = 0.0
    true_positives, false_positives = _positives(region_of > 0, run_ends)
    return true_positives, false_positives, np.cumsum(share[region_of])[run_ends]


def _positives(positive: np.ndarray, run_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positive counts at the run ends of tied scores, `positive` in descending
    order of the scores."""
    true_positives = np.cumsum(positive)[run_ends]
    return true_positives, np.flatnonzero(run_ends) + 1 - true_positives


def _rate(counts: np.ndarray) -> np.ndarray:
    """Cumulative counts as shares of their total (a true or false positive rate)."""
    return counts / max(1, int(counts[-1]))


def positives_descending(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positive counts at every distinct score of `scores`, descending, where
    `positive` marks the defects: what `ranking_metrics` reads."""
    order, run_ends = _descending(scores)
    return _positives(positive[order], run_ends)


def ranking_metrics(true_positives: np.ndarray, false_positives: np.ndarray) -> tuple[float, float, float]:
    """AUROC (ties count half), AP (recall gained times precision, summed over the thresholds) and F1-max (over
    the thresholds) from the cumulative true and false positive counts at every distinct score, descending."""
    n_defect = max(1, int(true_positives[-1]))
    tpr, fpr = _rate(true_positives), _rate(false_positives)
    auroc = float(np.trapezoid(np.concatenate([[0.0], tpr]), np.concatenate([[0.0], fpr])))  # = Mann-Whitney
    precision = true_positives / (true_positives + false_positives)
    ap = float((np.diff(true_positives, prepend=0) * precision).sum() / n_defect)
    f1_max = float((2 * true_positives / (true_positives + false_positives + n_defect)).max())
    return auroc, ap, f1_max


def aupro(maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit`; maps and masks are (N, H, W)."""
    _, false_positives, pro = _curves(maps, masks)
    return _area_under_curve(_rate(false_positives), pro, fpr_limit)


def pixel_auroc_and_aupro(maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> tuple[float, float]:
    """Pixel AUROC (ties count half, exact) and AUPRO from one sort of all pixel scores."""
    metrics, _ = pixel_metrics_and_pro_curve(maps, masks, fpr_limit)
    return metrics["pixel_auroc"], metrics["pixel_aupro"]


def pixel_metrics_and_pro_curve(
    maps: Tensor, masks: Tensor, fpr_limit: float = 0.3, points: int = 101
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Pixel AUROC, AP, F1-max and AUPRO from one sort of all pixel scores, and the PRO curve up to `fpr_limit`
    read at `points` evenly spaced FPRs (for plotting: the exact curve has a point per distinct pixel score)."""
    true_positives, false_positives, pro = _curves(maps, masks)
    auroc, ap, f1_max = ranking_metrics(true_positives, false_positives)
    fpr = _rate(false_positives)
    grid = np.linspace(0.0, fpr_limit, points)
    at_grid = np.interp(grid, np.concatenate([[0.0], fpr]), np.concatenate([[0.0], np.minimum(pro, 1.0)]))
    curve = {"fpr": grid.round(6).tolist(), "pro": at_grid.round(6).tolist(), "fpr_limit": fpr_limit}
    metrics = {"pixel_auroc": auroc, "pixel_ap": ap, "pixel_f1_max": f1_max}
    return metrics | {"pixel_aupro": _area_under_curve(fpr, pro, fpr_limit)}, curve


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
    pro_weights = np.concatenate([np.zeros(scores[0].size), *pro_weights])
    order, run_ends = _descending(np.concatenate(scores))
    fpr = np.cumsum(np.concatenate(fpr_weights)[order])[run_ends]
    return _area_under_curve(fpr, np.cumsum(pro_weights[order])[run_ends], fpr_limit)
