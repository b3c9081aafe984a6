"""STFPM lifecycle: SGD on the student, the teacher frozen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..trained import TrainedAnomalyModule
from .torch_model import STFPMModel


class STFPM(TrainedAnomalyModule):
    """STFPM (Wang et al., BMVC 2021): a student network learns to match a frozen teacher's features on normals.

    Args:
        backbone: teacher and student architecture, a timm features_only model (resnet18 as in the paper,
            wide_resnet50_2, efficientnet_lite0 with offline weights, or any timm name).
        layers: stages whose features are matched: stage indices (1-4) or names like layer2.
        pretrained: load ImageNet weights into the teacher (the student always starts random).
        weights_path: a state dict file for the teacher instead; for air-gapped sites.
        blur_sigma: Gaussian smoothing of the anomaly map in px; 0 (the paper) turns it off.
        lr: SGD learning rate (paper: 0.4).
        momentum: SGD momentum (paper: 0.9).
        weight_decay: SGD weight decay (paper: 1e-4).
        calibration_quantile: threshold quantile q in (0, 1) over held-out normals' scores (default 0.995).
        contamination: alternative to calibration_quantile: q = 1 - contamination. Not both.
        pixel_eval_size: compute pixel metrics at this square size in px (default: the input size).
        aupro_fpr_limit: false-positive-rate limit of AUPRO, in (0, 1]; 0.3 by default.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        blur_sigma: float = 0.0,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        calibration_quantile: float | None = None,
        contamination: float | None = None,
        pixel_eval_size: int | None = None,
        aupro_fpr_limit: float = 0.3,
    ) -> None:
        super().__init__(calibration_quantile, contamination, pixel_eval_size, aupro_fpr_limit)
        self.save_hyperparameters()
        self.model = STFPMModel(backbone, layers, pretrained, weights_path, blur_sigma)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            self.model.student.parameters(),
            lr=self.hparams.lr, momentum=self.hparams.momentum, weight_decay=self.hparams.weight_decay,
        )  # fmt: skip
