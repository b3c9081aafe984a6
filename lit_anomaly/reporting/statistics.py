"""Noise in image metrics: bootstrap intervals, DeLong's paired AUROC test, ranks over categories.

Everything here reads plain arrays of per-image scores and labels (per_image.jsonl), so a report or a
comparison of finished runs never needs the detector again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..metrics.classification import IMAGE_KEYS

RESAMPLES = 2000
CONFIDENCE = 0.95


def _auroc(normal: np.ndarray, defect: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mann-Whitney AUROC (ties count half) along `axis`, from ranks of the pooled scores."""
    from scipy.stats import rankdata

    normal, defect = np.moveaxis(normal, axis, -1), np.moveaxis(defect, axis, -1)
    n0, n1 = normal.shape[-1], defect.shape[-1]
    ranks = rankdata(np.concatenate([normal, defect], axis=-1), axis=-1)
    return (ranks[..., n0:].sum(-1) - n1 * (n1 + 1) / 2) / (n0 * n1)


def _average_precision(normal: np.ndarray, defect: np.ndarray, axis: int = -1) -> np.ndarray:
    """Average precision along `axis`: the sum over distinct thresholds of recall gained times precision."""
    normal, defect = np.moveaxis(normal, axis, -1), np.moveaxis(defect, axis, -1)
    scores = np.concatenate([normal, defect], axis=-1)
    labels = np.concatenate([np.zeros(normal.shape), np.ones(defect.shape)], axis=-1)
    order = np.argsort(-scores, axis=-1, kind="stable")
    scores, labels = np.take_along_axis(scores, order, -1), np.take_along_axis(labels, order, -1)
    run_end = np.concatenate([scores[..., 1:] != scores[..., :-1], np.ones((*scores.shape[:-1], 1), bool)], -1)
    true_positives = np.cumsum(labels, axis=-1)
    precision = true_positives / np.arange(1, scores.shape[-1] + 1)
    at_ends = np.where(run_end, true_positives, 0.0)
    before = np.concatenate([np.zeros((*at_ends.shape[:-1], 1)), np.maximum.accumulate(at_ends, -1)[..., :-1]], -1)
    return np.where(run_end, (true_positives - before) * precision, 0.0).sum(-1) / defect.shape[-1]


def _at_threshold(threshold: float, key: str) -> Callable[..., np.ndarray]:
    def statistic(normal: np.ndarray, defect: np.ndarray, axis: int = -1) -> np.ndarray:
        false_alarms = (normal >= threshold).sum(axis)
        hits = (defect >= threshold).sum(axis)
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
    statistics = {"image_auroc": _auroc, "image_ap": _average_precision}
    if threshold is not None and threshold == threshold:
        statistics |= {key: _at_threshold(threshold, key) for key in IMAGE_KEYS[2:]}
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


@dataclass
class PairedAurocTest:
    """DeLong's test of two AUROCs measured on the same images: z, two-sided p and the verdict at 0.05."""

    auroc_a: float
    auroc_b: float
    z: float
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05


def _structural_components(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's V10 (per defect: share of normals it outscores) and V01 (per normal: share of defects that
    outscore it), ties half, from midranks (Sun & Xu 2014) instead of the pairwise table."""
    from scipy.stats import rankdata

    defect, normal = scores[labels == 1], scores[labels == 0]
    pooled = rankdata(np.concatenate([defect, normal]))
    v10 = (pooled[: len(defect)] - rankdata(defect)) / len(normal)
    v01 = 1 - (pooled[len(defect) :] - rankdata(normal)) / len(defect)
    return v10, v01


def delong_test(scores_a: Sequence[float], scores_b: Sequence[float], labels: Sequence[int]) -> PairedAurocTest:
    """Whether two detectors' AUROCs on the same labelled images differ beyond noise (DeLong et al. 1988)."""
    from scipy.stats import norm

    labels = np.asarray(labels)
    a10, a01 = _structural_components(np.asarray(scores_a, dtype=np.float64), labels)
    b10, b01 = _structural_components(np.asarray(scores_b, dtype=np.float64), labels)
    auroc_a, auroc_b = float(a10.mean()), float(b10.mean())
    covariance_10 = np.cov(np.stack([a10, b10])) / len(a10)
    covariance_01 = np.cov(np.stack([a01, b01])) / len(a01)
    covariance = covariance_10 + covariance_01
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    difference = auroc_a - auroc_b
    if variance <= 1e-15:  # both perfect, or the same ranking: nothing to test
        z = 0.0 if abs(difference) < 1e-12 else float(np.sign(difference) * np.inf)
    else:
        z = difference / np.sqrt(variance)
    return PairedAurocTest(auroc_a, auroc_b, float(z), float(2 * norm.sf(abs(z))))


@dataclass
class RankSummary:
    """Mean rank of each run over the categories all runs finished (1 = best), and Friedman's test of
    whether the runs differ at all (None with fewer than three runs or two categories)."""

    metric: str
    categories: list[str]
    mean_rank: list[float]
    friedman_statistic: float | None
    friedman_p: float | None


def rank_summary(values: Sequence[Mapping[str, float | None]], metric: str) -> RankSummary:
    """`values[r][category]`: run r's metric per category; higher is better."""
    from scipy.stats import friedmanchisquare, rankdata

    shared = [c for c in values[0] if all(v.get(c) is not None for v in values)] if values else []
    if not shared:
        return RankSummary(metric, [], [float("nan")] * len(values), None, None)
    table = np.array([[v[c] for c in shared] for v in values])  # runs x categories
    ranks = rankdata(-table, axis=0)  # per category, over runs
    statistic = p_value = None
    if len(values) >= 3 and len(shared) >= 2:
        result = friedmanchisquare(*table)
        if np.isfinite(result.statistic):
            statistic, p_value = float(result.statistic), float(result.pvalue)
    return RankSummary(metric, shared, ranks.mean(axis=1).tolist(), statistic, p_value)
