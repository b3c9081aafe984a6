"""TensorBoard: score histograms and the test images that matter most, with maps and outlines drawn."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor


def heatmap(values: Tensor) -> Tensor:
    """(N, H, W) in [0, 1] to (N, 3, H, W) RGB on a black-red-yellow-white ramp."""
    v = values.clamp(0, 1)
    return torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], dim=1)


def outline(masks: Tensor) -> Tensor:
    """Boundary pixels (N, H, W) of binary masks: the mask minus its 3x3 erosion."""
    m = masks.float()[:, None]
    eroded = 1 - F.max_pool2d(1 - m, 3, stride=1, padding=1)
    return (m - eroded)[:, 0] > 0


def overlay(images: Tensor, maps: Tensor, masks: Tensor, low: float, high: float) -> Tensor:
    """Images (N, 3, H, W) with the anomaly map blended in (common scale low..high) and ground truth in green."""
    maps = F.interpolate(maps[:, None].float(), images.shape[-2:], mode="bilinear")[:, 0]
    masks = F.interpolate(masks[:, None].float(), images.shape[-2:], mode="nearest")[:, 0]
    blended = 0.55 * images + 0.45 * heatmap((maps - low) / max(high - low, 1e-12))
    edge = outline(masks)[:, None].expand_as(blended)
    green = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).expand_as(blended)
    return torch.where(edge, green, blended)


class TensorBoardArtifacts(pl.Callback):
    """Histograms of calibration and test scores; the top-k normals and bottom-k anomalies as overlays.

    Args:
        num_images: overlays per kind (highest-scoring normals, lowest-scoring anomalies).
        image_size: overlay size in px (square).
    """

    def __init__(self, num_images: int = 4, image_size: int = 192) -> None:
        self.num_images = num_images
        self.image_size = image_size

    @staticmethod
    def _writer(trainer: pl.Trainer):
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = self._writer(trainer)
        calibration = pl_module.calibration
        if writer is None or not trainer.is_global_zero or calibration is None or calibration.n == 0:
            return
        writer.add_histogram("calibration/scores", calibration.scores, trainer.current_epoch)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = self._writer(trainer)
        result = pl_module.test_result
        if writer is None or not trainer.is_global_zero or result is None:
            return
        scores, labels = result.score.float(), result.label
        for name, label in (("normal", 0), ("anomalous", 1)):
            if (labels == label).any():
                writer.add_histogram(f"test/scores_{name}", scores[labels == label], 0)
        maps, masks = result.maps, result.masks
        low, high = float(maps.min()), float(maps.max())
        size = (self.image_size, self.image_size)
        for tag, label, descending in (("highest_scoring_normals", 0, True), ("lowest_scoring_anomalies", 1, False)):
            positions = torch.nonzero(labels == label).flatten()
            if len(positions) == 0:
                continue
            chosen = positions[scores[positions].argsort(descending=descending)[: self.num_images]]
            images = F.interpolate(result.images[chosen].float() / 255, size, mode="bilinear", antialias=True)
            writer.add_images(f"test/{tag}", overlay(images, maps[chosen], masks[chosen], low, high), 0)
        writer.flush()
