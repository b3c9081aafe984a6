"""Decision threshold from normal scores only: a quantile, so no defect labels are needed on the line."""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_QUANTILE = 0.995


def resolve_quantile(calibration_quantile: float | None = None, contamination: float | None = None) -> float:
    """`calibration_quantile` if given, else 1 - `contamination` if given, else 0.995; always in (0, 1)."""
    if calibration_quantile is not None:
        if not 0.0 < calibration_quantile < 1.0:
            raise ValueError(f"--model.calibration_quantile must be in (0, 1), got {calibration_quantile}")
        return float(calibration_quantile)
    if contamination is not None:
        if not 0.0 < contamination < 1.0:
            raise ValueError(f"--model.contamination must be in (0, 1), got {contamination}")
        return 1.0 - float(contamination)
    return DEFAULT_QUANTILE


def quantile_threshold(scores: Tensor, quantile: float) -> float:
    """The `quantile` of normal `scores` with linear interpolation (numpy's default), in float64."""
    if scores.numel() == 0:
        raise ValueError("cannot calibrate a threshold on zero normal scores")
    return float(torch.quantile(scores.detach().double().flatten().cpu(), quantile))
