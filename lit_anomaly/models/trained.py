"""TrainedAnomalyModule: the lifecycle of detectors trained by gradient steps (STFPM, Reverse Distillation)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..metrics.calibration import SPLIT, Calibration
from .lifecycle import AnomalyModule


class TrainedAnomalyModule(AnomalyModule):
    """Lifecycle of detectors trained by gradient steps (STFPM, Reverse Distillation).

    fit: Lightning's training loop minimises `loss`; during fit, the validation loop logs `val_loss`
    on held-out normals (never anomaly labels), for EarlyStopping and TensorBoard. Calibration is a
    separate `Trainer.validate` after fit: the final weights score the held-out (or the family's own
    validation) normals and the rank rule sets the threshold. Retraining per fold would cost too
    much, so train images are not scored out of sample.
    """

    trains_with_gradients = True

    def __init__(
        self,
        calibration_quantile: float | None = None,
        contamination: float | None = None,
        pixel_eval_size: int | None = None,
        aupro_fpr_limit: float = 0.3,
    ) -> None:
        super().__init__(calibration_quantile, contamination, "none", pixel_eval_size, aupro_fpr_limit)

    def loss(self, images: Tensor) -> Tensor:
        return self.model.loss(images)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.model(images)

    def _calibrating(self) -> bool:
        return self.trainer.state.fn == "validate"

    def on_train_epoch_start(self) -> None:
        pass

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch["image"])
        if not torch.isfinite(loss):  # scores would be nan: every metric silently wrong
            raise ValueError(
                f"{type(self).__name__} training diverged (loss {float(loss)} at step {self.global_step}); "
                "lower --model.lr"
            )
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def on_train_epoch_end(self) -> None:
        pass

    def on_train_end(self) -> None:
        self.fitted.fill_(True)
        self.calibration = Calibration(None, self.quantile, "none", 0, None, None)  # until validate calibrates

    def on_validation_epoch_start(self) -> None:
        if self._calibrating():
            self.calibrator.reset()
            self._calibration_seconds, self._validation_started = 0.0, time.perf_counter()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._calibrating():
            self.calibrator.update(self.score(batch["image"])["score"], batch["index"], SPLIT)
        else:
            loss = self.loss(batch["image"])
            self.log("val_loss", loss, on_epoch=True, sync_dist=True, batch_size=len(batch["image"]))

    def on_validation_epoch_end(self) -> None:
        if self._calibrating():
            self._calibration_seconds = time.perf_counter() - self._validation_started
            self._calibrate(None)
