"""Statistics for comparing finished runs: DeLong's paired AUROC test and ranks over categories.

Everything here reads plain arrays of per-image scores and labels (per_image.jsonl), so a comparison of
finished runs never needs the detector again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


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
    whether the runs differ at all (None with fewer than three runs or two categories). Without a category
    that every run finished, every mean rank is None."""

    metric: str
    categories: list[str]
    mean_rank: list[float | None]
    friedman_statistic: float | None
    friedman_p: float | None


def rank_summary(values: Sequence[Mapping[str, float | None]], metric: str) -> RankSummary:
    """`values[r][category]`: run r's metric per category; higher is better."""
    from scipy.stats import friedmanchisquare, rankdata

    shared = [c for c in values[0] if all(v.get(c) is not None for v in values)] if values else []
    if not shared:
        return RankSummary(metric, [], [None] * len(values), None, None)
    table = np.array([[v[c] for c in shared] for v in values])  # runs x categories
    ranks = rankdata(-table, axis=0)  # per category, over runs
    statistic = p_value = None
    if len(values) >= 3 and len(shared) >= 2:
        result = friedmanchisquare(*table)
        if np.isfinite(result.statistic):
            statistic, p_value = float(result.statistic), float(result.pvalue)
    return RankSummary(metric, shared, ranks.mean(axis=1).tolist(), statistic, p_value)
