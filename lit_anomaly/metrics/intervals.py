"""Bootstrap intervals of the image metrics: how much a test set's size leaves them to chance.

Reads plain arrays of per-image scores and labels, so a report never needs the detector again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from ..runtime.decision import flagged
from .classification import IMAGE_KEYS, THRESHOLD_KEYS

RESAMPLES = 2000
CONFIDENCE = 0.95


def _auroc(normal: np.ndarray, defect: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mann-Whitney AUROC (ties count half) along `axis`, from ranks of the pooled scores."""
    from scipy.stats import rankdata

    normal, defect = np.moveaxis(normal, axis, -1), np.moveaxis(defect, axis, -1)
    n0, n1 = normal.shape[-1], defect.shape[-1]
    ranks = rankdata(np.concatenate([normal, defect], axis=-1), axis=-1)
    return (ranks[..., n0:].sum(-1) - n1 * (n1 + 1) / 2) / (n0 * n1)


def _ranked(normal: np.ndarray, defect: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along `axis`, in descending order of the pooled scores: the cumulative true positives, the count of
    images seen, and the mask of the last image of every run of tied scores."""
    normal, defect = np.moveaxis(normal, axis, -1), np.moveaxis(defect, axis, -1)
    scores = np.concatenate([normal, defect], axis=-1)
    labels = np.concatenate([np.zeros(normal.shape), np.ones(defect.shape)], axis=-1)
    order = np.argsort(-scores, axis=-1, kind="stable")
    scores, labels = np.take_along_axis(scores, order, -1), np.take_along_axis(labels, order, -1)
    run_end = np.concatenate([scores[..., 1:] != scores[..., :-1], np.ones((*scores.shape[:-1], 1), bool)], -1)
    return np.cumsum(labels, axis=-1), np.arange(1, scores.shape[-1] + 1), run_end


def _average_precision(normal: np.ndarray, defect: np.ndarray, axis: int = -1) -> np.ndarray:
    """Average precision along `axis`: the sum over distinct thresholds of recall gained times precision."""
    true_positives, seen, run_end = _ranked(normal, defect, axis)
    precision = true_positives / seen
    at_ends = np.where(run_end, true_positives, 0.0)
    before = np.concatenate([np.zeros((*at_ends.shape[:-1], 1)), np.maximum.accumulate(at_ends, -1)[..., :-1]], -1)
    return np.where(run_end, (true_positives - before) * precision, 0.0).sum(-1) / defect.shape[axis]


def _f1_max(normal: np.ndarray, defect: np.ndarray, axis: int = -1) -> np.ndarray:
    """The largest F1 along `axis` over distinct thresholds: 2 TP / (TP + FP + defects)."""
    true_positives, seen, run_end = _ranked(normal, defect, axis)
    return np.where(run_end, 2 * true_positives / (seen + defect.shape[axis]), 0.0).max(-1)


def _at_threshold(threshold: float, key: str) -> Callable[..., np.ndarray]:
    def statistic(normal: np.ndarray, defect: np.ndarray, axis: int = -1) -> np.ndarray:
        false_alarms = flagged(normal, threshold).sum(axis)
        hits = flagged(defect, threshold).sum(axis)
        misses = defect.shape[axis] - hits
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "image_f1": 2 * hits / (2 * hits + false_alarms + misses),
                "image_precision": hits / (hits + false_alarms),
                "image_recall": hits / defect.shape[axis],
                "image_specificity": 1 - false_alarms / normal.shape[axis],
            }[key]

    return statistic


def image_statistics(threshold: float | None) -> dict[str, Callable[..., np.ndarray]]:
    """Vectorised statistics of (normal scores, defect scores) for every image metric that has a value."""
    statistics = {"image_auroc": _auroc, "image_ap": _average_precision, "image_f1_max": _f1_max}
    if threshold is not None and threshold == threshold:
        statistics |= {key: _at_threshold(threshold, key) for key in THRESHOLD_KEYS}
    return statistics


def bootstrap_intervals(
    scores: Sequence[float], labels: Sequence[int], threshold: float | None, seed: int = 0, resamples: int = RESAMPLES
) -> dict[str, list[float] | None]:
    """95 % percentile bootstrap interval of every image metric, resampling normals and defects separately
    (the test set's class sizes are fixed by design, not drawn). None where a metric is undefined."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    normal, defect = scores[labels == 0], scores[labels == 1]
    intervals: dict[str, list[float] | None] = dict.fromkeys(IMAGE_KEYS)
    if len(normal) < 2 or len(defect) < 2:
        return intervals
    for key, statistic in image_statistics(threshold).items():
        with warnings.catch_warnings():  # a NaN bound (the metric undefined in some resample) becomes None below
            warnings.simplefilter("ignore", DegenerateDataWarning)
            result = bootstrap(
                (normal, defect), statistic, n_resamples=resamples, confidence_level=CONFIDENCE,
                method="percentile", vectorized=True, paired=False, batch=500, rng=np.random.default_rng(seed),
            )  # fmt: skip
        low, high = result.confidence_interval
        intervals[key] = None if np.isnan(low) or np.isnan(high) else [float(low), float(high)]  # as JSON has it
    return intervals
