"""Reverse Distillation lifecycle: Adam on the bottleneck and decoder, the encoder frozen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..trained import TrainedAnomalyModule
from .torch_model import ReverseDistillationModel


class ReverseDistillation(TrainedAnomalyModule):
    """Reverse Distillation (Deng & Li, CVPR 2022): a decoder reconstructs a frozen encoder's features from a
    one-class bottleneck; anomalies are where the reconstruction fails. The bottleneck (multi-scale fusion, then
    three residual blocks) and the decoder (the encoder reversed, residual block for residual block, upsampling
    by transposed convolutions) are the paper's; for backbones that are not ResNets they are built of basic
    residual blocks at the encoder's channels (`torch_model.stage_shapes`).

    Args:
        backbone: the encoder, a timm features_only model (wide_resnet50_2 as in the paper, resnet18,
            efficientnet_lite0 with offline weights, or any timm name whose stages are powers of two apart).
        layers: encoder stages reconstructed: stage indices (1-4) or names like layer2.
        pretrained: load ImageNet weights into the encoder.
        weights_path: a state dict file for the encoder instead; for air-gapped sites.
        blur_sigma: Gaussian smoothing of the anomaly map in px (paper: 4); 0 turns it off.
        lr: Adam learning rate (paper: 0.005).
        betas: Adam betas (paper: 0.5, 0.999).
        calibration_quantile: threshold quantile q in (0, 1) over held-out normals' scores (default 0.995).
        contamination: alternative to calibration_quantile: q = 1 - contamination. Not both.
        pixel_eval_size: compute pixel metrics at this square size in px (default: the input size).
        aupro_fpr_limit: false-positive-rate limit of AUPRO, in (0, 1]; 0.3 by default.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        blur_sigma: float = 4.0,
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.999),
        calibration_quantile: float | None = None,
        contamination: float | None = None,
        pixel_eval_size: int | None = None,
        aupro_fpr_limit: float = 0.3,
    ) -> None:
        super().__init__(calibration_quantile, contamination, pixel_eval_size, aupro_fpr_limit)
        self.save_hyperparameters()
        self.model = ReverseDistillationModel(backbone, layers, pretrained, weights_path, blur_sigma)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "model.bottleneck.fuse.0.weight" in checkpoint["state_dict"]:  # 0.2's plain convolution stack
            raise ValueError(
                "this Reverse Distillation checkpoint holds lit-anomaly 0.2's plain decoder; 0.3 mirrors the encoder "
                "with residual blocks as the paper does: fit it again"
            )
        super().on_load_checkpoint(checkpoint)

    def configure_optimizers(self) -> Any:
        trainable = [*self.model.bottleneck.parameters(), *self.model.decoder.parameters()]
        return torch.optim.Adam(trainable, lr=self.hparams.lr, betas=tuple(self.hparams.betas))
