"""AnomalyDataModule: the base of every dataset family; builds splits and loaders from a family's file lists."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..utils.process import init_loader_worker
from .cache import DecodeCache
from .dataset import AnomalyDataset, collate, to_float_batch
from .image_io import DEFAULT_MAX_IMAGE_PIXELS, check_pixels, has_alpha, shown_size
from .samples import IMAGE_EXTENSIONS, SPLITS, DatasetError, Sample, images_below, limit_test_samples


class AnomalyDataModule(pl.LightningDataModule):
    """Base of every dataset family. A subclass only lists files; this class builds splits and loaders.

    Subclasses implement `_train_samples`, `_test_samples` and `categories`, and may override
    `_calibration_samples` (a dedicated validation folder) and `_predict_samples`.

    Args:
        root: folder that holds the dataset's categories, laid out as distributed.
        category: category folder name under root; with fit+test also `all` (every category in turn) or a
            comma-separated list (`bottle,cable`).
        image_size: model input size [H, W] in pixels (or one int for square), at least 8; images and
            masks are resized to it.
        train_batch_size: images per batch while fitting.
        eval_batch_size: images per batch for calibration, test and predict.
        num_workers: DataLoader processes decoding images (capped at the CPU count); 0 decodes in-process.
        limit_train: fit on a seeded subset of at most this many train images (>= 1); null for all.
        limit_test: test on a seeded subset of at most this many images, normal and anomalous in
            proportion (>= 1); null for all.
        calibration_fraction: share of train normals held out from fitting to calibrate on, in [0, 1).
            Default (null): 0 for detectors that score every train normal out of sample (PatchCore,
            PaDiM), 0.1 for trained detectors (STFPM, ReverseDistillation), which calibrate on the hold-out.
        seed: seed of the hold-out and the limits.
        predict_dir: folder (searched recursively) of images for `predict`; needs no dataset tree.
        max_image_pixels: refuse, before decoding, any image whose header declares more pixels than this
            (default 100 Mpx).
        cache_dir: keep decoded, resized images and masks in this folder (opt-in), keyed by file path, size,
            modification time and image_size: a second run or detector on the same data decodes nothing.
    """

    CATEGORIES: tuple[str, ...] = ()
    EXPECTED_TREE = ""

    def __init__(
        self,
        root: str | Path,
        category: str,
        image_size: int | tuple[int, int] = (256, 256),
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 4,
        limit_train: int | None = None,
        limit_test: int | None = None,
        calibration_fraction: float | None = None,
        seed: int = 0,
        predict_dir: str | Path | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.update(root=str(root), predict_dir=str(predict_dir) if predict_dir else None)  # checkpoint-safe
        self.root = Path(root).expanduser()
        self.category = category
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise DatasetError(f"--data.image_size must be [H, W] of at least 8 px, got {image_size}")
        if calibration_fraction is not None and not 0.0 <= calibration_fraction < 1.0:
            raise DatasetError(f"--data.calibration_fraction must be in [0, 1), got {calibration_fraction}")
        for flag, value in (
            ("limit_train", limit_train), ("limit_test", limit_test),
            ("train_batch_size", train_batch_size), ("eval_batch_size", eval_batch_size),
        ):  # fmt: skip
            if value is not None and value < 1:
                raise DatasetError(f"--data.{flag} must be a positive number of images, got {value}")
        if num_workers < 0:
            raise DatasetError(f"--data.num_workers must be 0 (decode in-process) or more, got {num_workers}")
        self.train_batch_size = train_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = min(num_workers, os.cpu_count() or 1)
        self.limit_train = limit_train
        self.limit_test = limit_test
        self.calibration_fraction = calibration_fraction or 0.0
        self.seed = seed
        self.predict_dir = Path(predict_dir) if predict_dir else None
        if max_image_pixels < 1:
            raise DatasetError(f"--data.max_image_pixels must be a positive number of pixels, got {max_image_pixels}")
        self.max_image_pixels = max_image_pixels
        try:
            self.cache = DecodeCache(cache_dir) if cache_dir else None
        except OSError as error:
            raise DatasetError(
                f"--data.cache_dir {cache_dir}: cannot create the folder ({error.strerror or error})"
            ) from error
        self.hparams.update(cache_dir=str(cache_dir) if cache_dir else None)
        self.splits: dict[str, list[Sample]] = {}
        self.data_notes: dict[str, str] = {}  # oddities found in the files: resized or missing masks

    # ---- what a family provides -------------------------------------------------------------
    @classmethod
    def categories(cls, root: str | Path) -> list[str]:
        """Categories of this family under `root`: the fixed list, restricted to those on disk when root exists."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(cls._missing_root_message(root))
        present = [c for c in cls.CATEGORIES if (root / c).is_dir()]
        if not present:
            raise DatasetError(
                f"no {cls.__name__} category found under {root} (expected some of {', '.join(cls.CATEGORIES)})."
                f"\nExpected tree:\n{cls.EXPECTED_TREE}"
            )
        return present

    def _train_samples(self) -> list[Sample]:
        raise NotImplementedError

    def _test_samples(self) -> list[Sample]:
        raise NotImplementedError

    def _calibration_samples(self) -> list[Sample] | None:
        """A family's own held-out normals, or None to hold out `calibration_fraction` of train."""
        return None

    def _predict_samples(self) -> list[Sample]:
        return self._test_samples()

    # ---- shared machinery -------------------------------------------------------------------
    @property
    def category_root(self) -> Path:
        return self.root / self.category

    @classmethod
    def _missing_root_message(cls, root: Path) -> str:
        return f"{cls.__name__} root {root} does not exist or is not a folder.\nExpected tree:\n{cls.EXPECTED_TREE}"

    def _check_category(self) -> None:
        if not self.root.is_dir():
            raise DatasetError(self._missing_root_message(self.root))
        valid = self.categories(self.root)
        if self.category == "all" or "," in self.category:  # fit+test's loop takes these; nothing else does
            raise DatasetError(
                f"--data.category {self.category} names several categories: only fit+test runs them; test and "
                f"predict take one of {', '.join(valid)} (a unified detector predicts on --data.predict_dir with "
                "its class-agnostic threshold)"
            )
        if self.category not in valid:
            raise DatasetError(
                f"unknown {type(self).__name__} category {self.category!r} under {self.root}; valid: {', '.join(valid)}"
            )

    @property
    def calibration_source(self) -> str | None:
        """What the calibration split holds: "validation" (the family's own normals), "hold-out" or None."""
        if not self.samples("calibration"):
            return None
        return "hold-out" if self.calibration_fraction > 0 and not self._calibration_samples() else "validation"

    def _split_calibration(self, train: list[Sample]) -> tuple[list[Sample], list[Sample]]:
        own = self._calibration_samples()
        if own:
            return train, own
        if self.calibration_fraction == 0:
            return train, []
        n_calibration = max(1, round(self.calibration_fraction * len(train)))
        if n_calibration >= len(train):
            raise DatasetError(
                f"--data.calibration_fraction {self.calibration_fraction} holds out {n_calibration} of the "
                f"{len(train)} train images in {self._train_folder()}, leaving none to fit on"
            )
        held_out = set(random.Random(self.seed).sample(range(len(train)), n_calibration))
        return (
            [s for i, s in enumerate(train) if i not in held_out],
            [s for i, s in enumerate(train) if i in held_out],
        )

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_dir is not None:
            self.splits.setdefault("predict", self._predict_dir_samples())  # no dataset tree needed on the line
            return
        if "train" in self.splits:
            return
        self._check_category()
        train = self._train_samples()
        if not train:
            raise DatasetError(f"empty train split: no images found in {self._train_folder()}")
        train, calibration = self._split_calibration(train)
        if self.limit_train is not None and self.limit_train < len(train):
            keep = sorted(random.Random(self.seed + 1).sample(range(len(train)), self.limit_train))
            train = [train[i] for i in keep]
        test = self._test_samples()
        if self.limit_test is not None:
            test = limit_test_samples(test, self.limit_test, self.seed)
        predict = self._predict_dir_samples() if self.predict_dir is not None else self._predict_samples()
        self.splits = {"train": train, "calibration": calibration, "test": test, "predict": predict}
        self.data_notes = self._check_headers(train + calibration + test)

    def _check_headers(self, samples: list[Sample]) -> dict[str, str]:
        """Open every image and mask header (no decoding): a file that cannot be read or is too large fails
        here, on every DDP rank alike, before any fitting; masks of another size or missing are noted."""
        resized, missing, alpha = [], [], []
        for sample in samples:
            try:
                with Image.open(sample.path) as image:
                    check_pixels(image, sample.path, self.max_image_pixels)
                    size = shown_size(image)
                for mask_path in sample.masks:
                    with Image.open(mask_path) as mask:
                        mask_size = shown_size(mask)
                        if has_alpha(mask):
                            alpha.append(f"{mask_path} (mode {mask.mode})")
                    if mask_size != size:
                        resized.append(f"{mask_path} ({mask_size[0]}x{mask_size[1]} for a {size[0]}x{size[1]} image)")
            except DatasetError:
                raise
            except Exception as error:
                raise DatasetError(f"cannot read {sample.path} or its mask: {error}") from error
            if sample.label == 1 and not sample.masks:
                missing.append(str(sample.path))
        notes = {}
        if resized:
            notes["masks_resized"] = (
                f"{len(resized)} masks differ in size from their image and were resized (nearest), e.g. {resized[0]}"
            )
        if alpha:
            notes["masks_alpha"] = (
                f"{len(alpha)} masks carry an alpha channel, read only where the grey or colour channels are all "
                f"zero and the alpha varies, e.g. {alpha[0]}"
            )
        if missing:
            notes["masks_missing"] = (
                f"{len(missing)} anomalous images have no ground-truth mask and are left out of the pixel "
                f"metrics, e.g. {missing[0]}"
            )
        return notes

    def _predict_dir_samples(self) -> list[Sample]:
        if not self.predict_dir.is_dir():
            raise DatasetError(f"--data.predict_dir {self.predict_dir} does not exist or is not a folder")
        images = images_below(self.predict_dir)
        if not images:
            raise DatasetError(f"--data.predict_dir {self.predict_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return [Sample(p, -1, "unknown") for p in images]

    def _train_folder(self) -> Path:
        return self.category_root / "train" / "good"

    def samples(self, split: str) -> list[Sample]:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if split not in self.splits:
            self.setup("predict" if split == "predict" else None)
        return self.splits[split]

    def dataloader(self, split: str) -> DataLoader:
        batch_size = self.train_batch_size if split == "train" else self.eval_batch_size
        return DataLoader(
            AnomalyDataset(self.samples(split), self.image_size, self.max_image_pixels, self.cache),
            batch_size=batch_size,
            shuffle=False,  # memory-bank detectors need no shuffling, and fixed order keeps runs reproducible
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=False,
            worker_init_fn=init_loader_worker,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("calibration")  # validation during fit = scoring held-out normals

    def test_dataloader(self) -> DataLoader:
        if not self.samples("test"):
            raise DatasetError(self._no_test_images())
        return self.dataloader("test")

    def _no_test_images(self) -> str:
        return f"no test images found under {self.category_root / 'test'}"

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader("predict")

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # raised here, in the main process, not as a worker's stack trace; predict goes on without the file
        if batch["failed"] and not (self.trainer is not None and self.trainer.predicting):
            raise DatasetError(batch["failed"][0]["error"])
        return batch

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return to_float_batch(batch, strict=False)
