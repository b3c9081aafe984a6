"""Predictions on disk: one JSON line per image, and anomaly maps in MVTec AD 2's submission layout."""

from __future__ import annotations

import json
import signal
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

from ..runtime.files import RunError, holds_anything, sanitize, write_atomic
from ..runtime.image import shown_size
from ..runtime.outputs import map_at_image_size, output_names, prediction_line, write_map_files
from ..runtime.signals import DeferredSignals


class PredictionWriter(BasePredictionWriter):
    """Writes what `lit-anomaly predict` finds: one JSON line per image and, optionally, its anomaly map.

    A file that cannot be read becomes a line with `error` and no score; the others are still written.

    Args:
        output_dir: folder for predictions.jsonl (in input order; under DDP each process writes
            predictions.rank<N>.jsonl as it goes, merged into predictions.jsonl at the end) and the maps.
        save_maps: also write anomaly_images/<category>/<split>/<name>.tiff (float32 maps at each image's
            own size, MVTec AD 2's submission layout) and anomaly_images_thresholded/.../<name>.png
            (0/255 at the calibrated threshold); <name> is the image's path below the inputs' common folder.
    """

    def __init__(self, output_dir: str = "predictions", save_maps: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.save_maps = save_maps
        self.failed = 0
        self.written = 0

    def check_output(self) -> None:
        """Refuse a folder that is a file or holds anything: an earlier predict's lines were replaced and its
        maps mixed with the new ones."""
        folder = self.output_dir
        if holds_anything(folder):
            raise RunError(
                f"predictions folder {folder} is not empty (an earlier predict's results?); move it "
                "away or write elsewhere with --trainer.default_root_dir DIR"
            )

    def _lines_path(self, trainer: pl.Trainer) -> Path:
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        return self.output_dir / f"predictions{suffix}.jsonl"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.failed = self.written = 0
        self._started = False  # the folder and file are made with the first batch: a refused run leaves none
        self._signals = DeferredSignals().start()  # Lightning's predict loop never checks for SIGTERM
        samples = trainer.datamodule.samples("predict") if trainer.datamodule is not None else []
        self._names = output_names([s.path for s in samples])

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
        category = sanitize(str(getattr(datamodule, "category", "custom")))
        split = sanitize(str(getattr(datamodule, "predict_split", "predict")))
        threshold = prediction["threshold"]
        lines = []
        for i, path in enumerate(prediction["path"]):
            score = float(prediction["score"][i])
            lines.append(prediction_line(int(prediction["index"][i]), path, category, score, threshold))
            if self.save_maps:
                self._write_map(Path(path), prediction["anomaly_map"][i], threshold, category, split)
        for failure in prediction["failed"]:
            lines.append(
                prediction_line(failure["index"], failure["path"], category, None, threshold, failure["error"])
            )
        self.failed += len(prediction["failed"])
        self.written += len(lines)
        if not self._started:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._started = True
        with self._lines_path(trainer).open("a") as stream:
            stream.writelines(json.dumps(line) + "\n" for line in lines)
        if self._signals.received is not None:  # the batch in hand is on disk, whole: stop here
            raise KeyboardInterrupt if self._signals.received == signal.SIGINT else SIGTERMException

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict" and hasattr(self, "_signals"):
            self._signals.stop()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # each DDP rank scored its share: every rank holds the totals, so rank 0's exit status counts all files
        counts = torch.tensor([self.failed, self.written], device=pl_module.device)
        self.failed, self.written = (int(c) for c in trainer.strategy.reduce(counts, reduce_op="sum"))
        if trainer.world_size > 1:
            self._merge_ranks(trainer)

    def _merge_ranks(self, trainer: pl.Trainer) -> None:
        """One predictions.jsonl in input order, as one process writes it. The lines travel to rank 0 through
        the process group, not the file system: the ranks of several nodes may each see a disk of their own.
        Each rank's file stays until the merged one is on disk."""
        own = self._lines_path(trainer)
        shares = [None] * trainer.world_size if trainer.global_rank == 0 else None
        torch.distributed.gather_object(own.read_text() if own.exists() else "", shares, dst=0)  # a rank may get none
        if shares is not None:  # Lightning's predict sampler gives every input to one rank: no repeats to drop
            records = sorted(
                (json.loads(line) for share in shares for line in share.splitlines()), key=itemgetter("index")
            )
            write_atomic(self.output_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        trainer.strategy.barrier("predictions merged")
        own.unlink(missing_ok=True)

    def _write_map(self, path: Path, anomaly_map: Tensor, threshold: float | None, category: str, split: str) -> None:
        with Image.open(path) as image:
            size = shown_size(image)  # the map lines up with the image as a viewer shows it
        resized = map_at_image_size(anomaly_map[0].float().cpu().numpy(), size)
        name = self._names.get(str(path), Path(sanitize(path.stem)))
        write_map_files(self.output_dir, name, category, split, resized, threshold)
