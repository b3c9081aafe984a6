"""TensorBoard: score histograms and the test images that matter most, with maps and outlines drawn."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from ..metrics.calibration import Calibration
from ..metrics.evaluation import TestResult
from ..reporting.hard_cases import colour_range, result_records, select_hard_cases


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
    """Histograms of calibration and test scores; the hardest cases (highest-scoring normals, lowest-scoring
    anomalies) as overlays, chosen and coloured as report.html chooses and colours them.

    Args:
        num_images: overlays per kind (highest-scoring normals, lowest-scoring anomalies).
        image_size: overlay size in px (square).
    """

    KINDS = {"false_alarm": "highest_scoring_normals", "missed_defect": "lowest_scoring_anomalies"}

    def __init__(self, num_images: int = 4, image_size: int = 192) -> None:
        self.num_images = num_images
        self.image_size = image_size

    @staticmethod
    def _writer(trainer: pl.Trainer):
        if not trainer.is_global_zero:
            return None
        return next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def on_calibration(self, trainer: pl.Trainer, calibration: Calibration) -> None:
        writer = self._writer(trainer)
        if writer is not None and calibration.n > 0:
            writer.add_histogram("calibration/scores", calibration.scores, trainer.current_epoch)

    def on_test_result(self, trainer: pl.Trainer, result: TestResult) -> None:
        writer = self._writer(trainer)
        if writer is None:
            return
        scores, labels = result.score.float(), result.label
        for name, label in (("normal", 0), ("anomalous", 1)):
            if (labels == label).any():
                writer.add_histogram(f"test/scores_{name}", scores[labels == label], 0)
        low, high = colour_range(result.maps, labels)
        position = {int(i): p for p, i in enumerate(result.index.tolist())}
        cases = select_hard_cases(result_records(result), self.num_images)
        size = (self.image_size, self.image_size)
        for kind, tag in self.KINDS.items():
            chosen = torch.tensor([position[c["index"]] for c in cases if c["kind"] == kind], dtype=torch.long)
            if len(chosen) == 0:
                continue
            images = F.interpolate(result.images[chosen].float() / 255, size, mode="bilinear", antialias=True)
            pictures = overlay(images, result.maps[chosen], result.masks[chosen], low, high)
            writer.add_images(f"test/{tag}", pictures.clamp(0, 1), 0)
        writer.flush()
