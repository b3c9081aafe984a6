"""Everything computed on a finished test: image and pixel metrics, per defect type, sPRO and intervals.

The detector hands its gathered test outputs to `evaluate_test` (what `lit-anomaly test` logs); the category
pipeline adds `extra_metrics` (what needs the dataset's defect types and sPRO annotations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..runtime.decision import flagged
from .aupro import au_spro, pixel_metrics_and_pro_curve
from .classification import PIXEL_KEYS, image_metrics, mean_of_published
from .intervals import bootstrap_intervals


@dataclass
class TestResult:
    """What a test epoch produced, gathered over ranks and sorted by test index."""

    index: Tensor
    score: Tensor  # float64, raw scale
    label: Tensor
    pred: Tensor | None  # flagged(score, threshold), None without a threshold
    maps: Tensor  # (N, H, W) at the evaluation resolution
    masks: Tensor  # (N, H, W) bool
    images: Tensor  # (N, 3, h, w) uint8, as the detector saw them: overlays need not decode them again
    threshold: float | None
    metrics: dict[str, float | None]
    notes: dict[str, str]
    curves: dict[str, Any] = field(default_factory=dict)  # the PRO curve for plots, where masks exist


@dataclass
class ExtraMetrics:
    """Metrics that need the dataset besides the test outputs: per defect type, sPRO, bootstrap intervals."""

    by_defect_type: dict[str, dict[str, float | None]]
    intervals: dict[str, list[float] | None]
    spro: float | None = None
    notes: dict[str, str] = field(default_factory=dict)


def evaluate_test(outputs: Mapping[str, Tensor], threshold: float | None, aupro_fpr_limit: float) -> TestResult:
    """Image metrics on raw scores and pixel metrics on raw maps, from gathered test outputs (`index`, `score`,
    `label`, `has_mask`, `map`, `mask`, `image`)."""
    metrics, notes = image_metrics(outputs["score"], outputs["label"], threshold)
    pixel, curves = pixel_metrics(outputs, notes, aupro_fpr_limit)
    metrics.update(pixel)
    metrics["mad"] = mean_of_published(metrics)
    if metrics["mad"] is None:
        notes["mad"] = "one of its seven parts has no value"
    return TestResult(
        index=outputs["index"], score=outputs["score"], label=outputs["label"],
        pred=flagged(outputs["score"], threshold).long() if threshold is not None else None,
        maps=outputs["map"], masks=outputs["mask"], images=outputs["image"], threshold=threshold,
        metrics=metrics, notes=notes, curves=curves,
    )  # fmt: skip


def pixel_metrics(
    outputs: Mapping[str, Tensor], notes: dict[str, str], aupro_fpr_limit: float
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Pixel AUROC, AP, F1-max and AUPRO over the images with a usable mask (normal images count as all-normal
    masks), from one sort of their pixels."""
    usable = outputs["has_mask"] & (outputs["label"] >= 0)
    maps, masks = outputs["map"][usable], outputs["mask"][usable]
    empty = int(((outputs["label"] == 1) & outputs["has_mask"] & ~outputs["mask"].flatten(1).any(1)).sum())
    if empty:
        notes["masks_empty"] = (
            f"{empty} anomalous test images have an all-zero mask: they add normal pixels only to the pixel metrics"
        )
    if not masks.any() or masks.all():
        reason = "no ground-truth masks for anomalous test images" if not masks.any() else "no normal pixels"
        notes.update(dict.fromkeys(PIXEL_KEYS, reason))
        return dict.fromkeys(PIXEL_KEYS), {}
    metrics, curve = pixel_metrics_and_pro_curve(maps, masks, aupro_fpr_limit)
    return metrics, {"pro": curve}


def metrics_by_defect_type(
    scores: Sequence[float], labels: Sequence[int], defect_types: Sequence[str], threshold: float | None
) -> dict[str, dict[str, float | None]]:
    """Image metrics of each defect type against all good images (MVTec LOCO reports logical/structural so);
    empty with fewer than two defect types."""
    pairs = list(zip(defect_types, labels, strict=True))
    types = sorted({t for t, label in pairs if label == 1})
    out = {}
    for defect_type in types if len(types) > 1 else ():
        chosen = [i for i, (t, label) in enumerate(pairs) if label == 0 or t == defect_type]
        subset_scores = torch.tensor([scores[i] for i in chosen], dtype=torch.float64)
        subset_labels = torch.tensor([labels[i] for i in chosen])
        out[defect_type] = image_metrics(subset_scores, subset_labels, threshold)[0]
    return out


def spro(
    result: TestResult, defects_by_image: Mapping[int, Sequence[tuple[Tensor, float]]], fpr_limit: float = 0.05
) -> tuple[float | None, str | None]:
    """MVTec LOCO's AU-sPRO (FPR limit 0.05 as in the LOCO paper) over the test maps, or (None, why).

    `defects_by_image` maps a test index to its defects, each a mask at the maps' size and its saturation area."""
    position = {int(i): p for p, i in enumerate(result.index.tolist())}
    defects = [
        (position[i], mask, area) for i, found in defects_by_image.items() if i in position for mask, area in found
    ]
    good = [p for p, label in enumerate(result.label.tolist()) if label == 0]
    if not defects or not good:
        return None, "needs annotated defects and good test images"
    return au_spro(result.maps, defects, good, fpr_limit), None


def extra_metrics(
    result: TestResult,
    defect_types: Sequence[str],
    spro_defects: Mapping[int, Sequence[tuple[Tensor, float]]] | str | None = None,
) -> ExtraMetrics:
    """Per-defect-type metrics, bootstrap intervals and, where the dataset has sPRO annotations
    (`spro_defects`, or the reason they cannot be read), AU-sPRO. `defect_types` are the test images' types in
    the order of `result`."""
    scores, labels = result.score.tolist(), result.label.tolist()
    extra = ExtraMetrics(
        by_defect_type=metrics_by_defect_type(scores, labels, defect_types, result.threshold),
        intervals=bootstrap_intervals(scores, labels, result.threshold),
    )
    if isinstance(spro_defects, str):
        extra.notes["pixel_spro"] = spro_defects
    elif spro_defects is not None:
        extra.spro, why = spro(result, spro_defects)
        if why:
            extra.notes["pixel_spro"] = why
    return extra
