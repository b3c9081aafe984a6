"""Image- and pixel-level metrics on raw scores.

torchmetrics treats scores outside [0, 1] as logits and applies a sigmoid, which saturates raw
anomaly scores into ties (sigmoid(40) == 1.0 in float64) and silently corrupts AUROC. Ranking is
what AUROC and AP measure, so scores are first mapped to their dense rank in [0, 1]: strictly
monotonic, ties kept, nothing saturates.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    binary_precision,
    binary_recall,
    binary_specificity,
)

from ..runtime.decision import flagged
from .aupro import positives_descending, ranking_metrics

RANKING_KEYS = ("image_auroc", "image_ap", "image_f1_max")  # over every threshold: no calibration needed
THRESHOLD_KEYS = ("image_f1", "image_precision", "image_recall", "image_specificity")  # at the calibrated one
IMAGE_KEYS = RANKING_KEYS + THRESHOLD_KEYS
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
# ADer's mAD (Zhang et al., 2024): the mean of the seven metrics published tables report
MAD_PARTS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")


def rank_scores(scores: Tensor) -> Tensor:
    """Dense ranks of `scores` scaled to [0, 1] (float64): same order and ties, no sigmoid applied downstream."""
    unique, inverse = torch.unique(scores.flatten(), return_inverse=True)
    return inverse.double() / max(1, len(unique) - 1)


def image_metrics(scores: Tensor, labels: Tensor, threshold: float | None) -> tuple[dict, dict]:
    """Metrics over images labelled 0/1 (label -1 ignored); returns (metrics, notes for the ones that are None)."""
    known = labels >= 0
    scores, labels = scores[known].double().cpu(), labels[known].long().cpu()
    metrics: dict[str, float | None] = dict.fromkeys(IMAGE_KEYS)
    notes: dict[str, str] = {}
    if len(labels) == 0:
        return metrics, dict.fromkeys(IMAGE_KEYS, "no labelled test images")
    if labels.min() == labels.max():
        notes.update(dict.fromkeys(RANKING_KEYS, "test set has only one class"))
    else:
        ranked = rank_scores(scores)
        metrics["image_auroc"] = float(binary_auroc(ranked, labels))
        metrics["image_ap"] = float(binary_average_precision(ranked, labels))
        metrics["image_f1_max"] = ranking_metrics(*positives_descending(scores.numpy(), labels.numpy() == 1))[2]
    if threshold is None or threshold != threshold:
        reason = "no calibrated threshold (no calibration normals)"
        notes.update(dict.fromkeys(THRESHOLD_KEYS, reason))
        return metrics, notes
    predictions = flagged(scores, threshold).long()
    undefined = {  # a ratio whose denominator is empty: null with the reason, never a 0 that means nothing
        "image_f1": "no anomalous test images" if not labels.any() else None,
        "image_recall": "no anomalous test images" if not labels.any() else None,
        "image_precision": "no test image is at or above the threshold" if not predictions.any() else None,
        "image_specificity": "no normal test images" if labels.all() else None,
    }
    for key, fn in (
        ("image_f1", binary_f1_score), ("image_precision", binary_precision),
        ("image_recall", binary_recall), ("image_specificity", binary_specificity),
    ):  # fmt: skip
        if undefined[key]:
            notes[key] = undefined[key]
        else:
            metrics[key] = float(fn(predictions, labels))
    return metrics, notes


def mean_of_published(metrics: dict[str, float | None]) -> float | None:
    """ADer's mAD: the mean of `MAD_PARTS`, or None where one of them has no value."""
    parts = [metrics.get(key) for key in MAD_PARTS]
    return None if any(value is None for value in parts) else sum(parts) / len(parts)


def pixel_auroc(maps: Tensor, masks: Tensor) -> float:
    """Pixel AUROC over all pixels of all given images (maps and masks of one shape)."""
    return float(binary_auroc(rank_scores(maps), masks.flatten().long()))
