"""Decision thresholds from normal scores only, with a finite-sample promise (split-conformal rank rule).

For n exchangeable out-of-sample normal scores, the k-th smallest with k = ceil((n + 1) q) is a
threshold at or above which an unseen normal lands with probability at most (n + 1 - k) / (n + 1)
<= 1 - q. With too few normals (k > n) no threshold keeps that promise: the largest score is used and
the promise weakens to 1 / (n + 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

DEFAULT_QUANTILE = 0.995
# Where calibration scores come from; `train` scores are out of sample (leave-one-out, k-fold).
TRAIN, SPLIT = 0, 1
SOURCE_SPLITS = {TRAIN: "train", SPLIT: "calibration"}  # the datamodule split each source's indices point into


def resolve_quantile(calibration_quantile: float | None = None, contamination: float | None = None) -> float:
    """`calibration_quantile` if given, else 1 - `contamination` if given, else 0.995; always in (0, 1)."""
    if calibration_quantile is not None and contamination is not None:
        raise ValueError(
            f"give --model.calibration_quantile ({calibration_quantile}) or --model.contamination "
            f"({contamination}), not both: both set the threshold's quantile"
        )
    if calibration_quantile is not None:
        if not 0.0 < calibration_quantile < 1.0:
            raise ValueError(f"--model.calibration_quantile must be in (0, 1), got {calibration_quantile}")
        return float(calibration_quantile)
    if contamination is not None:
        if not 0.0 < contamination < 1.0:
            raise ValueError(f"--model.contamination must be in (0, 1), got {contamination}")
        return 1.0 - float(contamination)
    return DEFAULT_QUANTILE


def conformal_rank(n: int, quantile: float) -> int:
    """k = ceil((n + 1) q), the rank (1-based) of the threshold among n sorted scores; may exceed n."""
    return math.ceil((n + 1) * quantile - 1e-9)  # (n + 1) q is often an integer up to rounding


def normals_needed(quantile: float) -> int:
    """The fewest normals with k <= n, i.e. n >= q / (1 - q): 199 for q = 0.995, 19 for 0.95."""
    return math.ceil(quantile / (1.0 - quantile) - 1e-9)


@dataclass
class Calibration:
    """A calibrated threshold and where it came from; `provenance()` is what reports and checkpoints carry.

    A detector fitted on several categories at once (a unified run) carries one threshold over all their
    normals (class-agnostic) and, in `categories`, each category's own threshold over its own normals."""

    threshold: float | None
    quantile: float
    method: str
    n: int
    rank: int | None
    false_alarm_bound: float | None
    # sorted; 0-d for a single score where a torchmetrics compute returned it (it squeezes one-element tensors)
    scores: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64), repr=False)
    seconds: float = 0.0
    margin: float = 0.0  # added to the rank rule's score: what storing train features at lower precision can hide
    categories: dict[str, Calibration] = field(default_factory=dict)

    def for_category(self, category: str | None) -> Calibration:
        """The calibration that decides for `category`: its own in a unified run, else this one."""
        return self.categories.get(category, self) if category is not None else self

    def with_margin(self, margin: float) -> Calibration:
        """This calibration with `margin` added to its threshold (none is added without a threshold)."""
        if margin <= 0:
            return self
        categories = {c: own.with_margin(margin) for c, own in self.categories.items()}
        if self.threshold is None:
            return replace(self, categories=categories)
        raised = torch.tensor(self.threshold + margin, dtype=torch.float64)
        single = raised.float()  # a float32 value, as scores are, never below the sum
        if single.double() < raised:
            single = torch.nextafter(single, torch.tensor(math.inf))
        return replace(self, threshold=float(single), margin=self.margin + margin, categories=categories)

    @property
    def short_of_normals(self) -> bool:
        """True when q cannot be promised with n normals, so the threshold is the largest score."""
        return self.n > 0 and conformal_rank(self.n, self.quantile) > self.n

    def provenance(self) -> dict[str, Any]:
        provenance = {
            "quantile": self.quantile,
            "method": self.method,
            "n": self.n,
            "rank": self.rank,
            "false_alarm_bound": self.false_alarm_bound,
            "score_range": [float(self.scores.min()), float(self.scores.max())] if self.scores.numel() else None,
            "source": "rank rule k = ceil((n + 1) q) over out-of-sample scores of normal images",
        }
        if self.categories:
            provenance["scope"] = f"class-agnostic: the normals of all {len(self.categories)} categories"
        if self.short_of_normals:
            provenance["normals_needed"] = normals_needed(self.quantile)
        if self.margin:
            provenance["storage_rounding_margin"] = self.margin
        return provenance

    def shortfall_message(self) -> str | None:
        """One line for stderr when the promised share had to be weakened or there is no threshold, else None."""
        if self.n == 0:
            return (
                "no normal image could be scored out of sample (fewer than two train images, or no held-out "
                "normals): there is no threshold, so every pred is null; give at least two train normals"
            )
        if not self.short_of_normals:
            return None
        return (
            f"q = {self.quantile:g} needs at least {normals_needed(self.quantile)} calibration normals, "
            f"got {self.n}: the threshold is the largest score and promises a false-alarm share of at most "
            f"1/(n + 1) = {self.false_alarm_bound:.3g}"
        )

    def state(self) -> dict[str, Any]:
        """Plain values for a checkpoint (no tensors but the scores)."""
        return {**{k: getattr(self, k) for k in ("threshold", "quantile", "method", "n", "rank", "margin")},
                "false_alarm_bound": self.false_alarm_bound, "scores": self.scores.reshape(-1).cpu(),
                "categories": {c: own.state() for c, own in self.categories.items()}}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Calibration:
        categories = {c: cls.from_state(own) for c, own in state.get("categories", {}).items()}
        return cls(**{**state, "categories": categories})


def conformal_threshold(scores: Tensor, quantile: float, method: str = "given") -> Calibration:
    """The rank-rule threshold of out-of-sample normal `scores` at `quantile`."""
    scores = scores.detach().double().flatten().cpu().sort().values
    n = len(scores)
    if n == 0:
        return Calibration(None, quantile, method, 0, None, None, scores)
    rank = conformal_rank(n, quantile)
    bound = 1.0 - quantile if rank <= n else 1.0 / (n + 1)  # what is promised; (n + 1 - k) / (n + 1) <= 1 - q
    rank = min(rank, n)
    return Calibration(float(scores[rank - 1]), quantile, method, n, rank, bound, scores)


class ThresholdCalibrator(Metric):
    """Collects out-of-sample normal scores (on every rank) and computes the rank-rule threshold.

    `update(scores, index, source)` takes each image's score with its index in its split; `source` is
    TRAIN (train normals scored by a model that did not see them) or SPLIT (held-out or validation
    normals scored by the final model). Under DDP `compute` gathers every rank's scores and drops the
    repeats DistributedSampler pads shards with, so the threshold equals one device's.

    Args:
        quantile: the share of normal images the threshold keeps below it, in (0, 1).
    """

    full_state_update = False

    def __init__(self, quantile: float = DEFAULT_QUANTILE) -> None:
        super().__init__()
        self.quantile = quantile
        self.add_state("records", default=[], dist_reduce_fx="cat")  # rows (source, index, score), float64

    def update(self, scores: Tensor, index: Tensor, source: int) -> None:  # type: ignore[override]
        rows = torch.stack(
            [torch.full_like(scores, source, dtype=torch.float64), index.double(), scores.detach().double()], dim=1
        )
        self.records.append(rows.reshape(-1, 3))

    def compute(  # type: ignore[override]
        self,
        train_method: str | None = None,
        split_method: str | None = None,
        categories: Mapping[int, Sequence[str]] | None = None,
    ) -> Calibration:
        """The threshold over every collected score. With `categories` (per source, the category of each index:
        the splits of a unified run), each category also gets its own over its own scores, in `.categories`."""
        records = torch.cat(self.records) if isinstance(self.records, list) else self.records
        records = records.reshape(-1, 3).cpu()
        if len(records):  # one row per (source, index), in a fixed order
            keys = records[:, 0] * 2**40 + records[:, 1]
            keys, order = keys.sort(stable=True)
            first = torch.ones_like(keys, dtype=torch.bool)
            first[1:] = keys[1:] != keys[:-1]
            records = records[order][first]
        calibration = self._threshold(records, train_method, split_method)
        if categories:
            of_row = [categories[source][index] for source, index in records[:, :2].long().tolist()]
            for name in dict.fromkeys(name for names in categories.values() for name in names):
                own = torch.tensor([category == name for category in of_row], dtype=torch.bool)
                calibration.categories[name] = self._threshold(records[own], train_method, split_method)
        return calibration

    def _threshold(self, records: Tensor, train_method: str | None, split_method: str | None) -> Calibration:
        sources = set(records[:, 0].long().tolist())
        names = [name for source, name in ((TRAIN, train_method), (SPLIT, split_method)) if source in sources]
        return conformal_threshold(records[:, 2], self.quantile, "+".join(n for n in names if n) or "none")
