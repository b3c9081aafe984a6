"""Predictions on disk: one JSON line per image, and anomaly maps in MVTec AD 2's submission layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Writes `<output_dir>/predictions.jsonl` (path, score, threshold, pred) and, with `save_maps`,
    `anomaly_images/<category>/<split>/<stem>.tiff` (float32 maps at the image's own size) and
    `anomaly_images_thresholded/<category>/<split>/<stem>.png` (0/255 at the calibrated threshold)."""

    def __init__(self, output_dir: str = "predictions", save_maps: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.save_maps = save_maps

    def _lines_path(self, trainer: pl.Trainer) -> Path:
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        return self.output_dir / f"predictions{suffix}.jsonl"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._lines_path(trainer).write_text("")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        datamodule = trainer.datamodule
        category = getattr(datamodule, "category", "custom")
        split = getattr(datamodule, "predict_split", "predict")
        threshold = prediction["threshold"]
        lines = []
        for i, path in enumerate(prediction["path"]):
            score = float(prediction["score"][i])
            lines.append(
                {
                    "index": int(prediction["index"][i]),
                    "path": path,
                    "category": category,
                    "score": score,
                    "threshold": threshold,
                    "pred": int(score >= threshold) if threshold is not None else None,
                }
            )
            if self.save_maps:
                self._write_map(Path(path), prediction["anomaly_map"][i], threshold, category, split)
        with self._lines_path(trainer).open("a") as stream:
            stream.writelines(json.dumps(line) + "\n" for line in lines)

    def _write_map(self, path: Path, anomaly_map: Any, threshold: float | None, category: str, split: str) -> None:
        with Image.open(path) as image:
            width, height = image.size
        resized = F.interpolate(anomaly_map[None].float(), (height, width), mode="bilinear")[0, 0].cpu().numpy()
        maps_dir = self.output_dir / "anomaly_images" / category / split
        maps_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(resized.astype(np.float32), mode="F").save(maps_dir / f"{path.stem}.tiff")
        if threshold is not None:
            binary_dir = self.output_dir / "anomaly_images_thresholded" / category / split
            binary_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(((resized >= threshold) * 255).astype(np.uint8)).save(binary_dir / f"{path.stem}.png")
