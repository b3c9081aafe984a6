"""The decision rule, once for every engine, metric and report."""

from __future__ import annotations

from typing import TypeVar

Scores = TypeVar("Scores")


def flagged(score: Scores, threshold: float) -> Scores:
    """Whether a part is flagged: its score lies strictly above the threshold (a bool, or an array or tensor of
    them). The threshold is the k-th smallest of n out-of-sample normal scores, k = ceil((n + 1) q), and an
    unseen good part scores strictly above it with probability at most 1 - q even where scores tie; with `>=`
    a category of identical good parts, all scoring the threshold itself, would be flagged whole."""
    return score > threshold
