"""What every dataset family shares: split building, limits, image decoding and the batch contract."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from .cache import DecodeCache

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "calibration", "test", "predict")


class DatasetError(ValueError):
    """Bad dataset input; the message names the path or value and what was expected."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous, -1 unknown
    defect_type: str
    masks: tuple[Path, ...] = ()  # several masks (MVTec LOCO) are OR-ed together


def is_hidden(path: Path) -> bool:
    """A dot name: never data. Copies from a Mac to FAT or network drives leave a `._NAME.png` beside every
    image (AppleDouble metadata, not a PNG), and Jupyter leaves `.ipynb_checkpoints/` folders of copies."""
    return path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, any supported extension in any case, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p)
    )


def subfolders(folder: Path) -> list[Path]:
    """The folders directly inside `folder`, sorted by name, hidden ones left out."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p)) if folder.is_dir() else []


def find_mask(folder: Path, stem: str, suffixes: Sequence[str] = ("_mask", "")) -> Path | None:
    """The mask file for image `stem` in `folder`: `<stem><suffix>.<any image ext>`, first suffix wins."""
    for suffix in suffixes:
        for ext in IMAGE_EXTENSIONS:
            for candidate in (folder / f"{stem}{suffix}{ext}", folder / f"{stem}{suffix}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def labelled_folder(folder: Path, label: int, defect_type: str, mask_dir: Path | None = None) -> list[Sample]:
    """Every image of one folder as samples; masks are looked up in `mask_dir` when given."""
    samples = []
    for path in list_images(folder):
        mask = find_mask(mask_dir, path.stem) if mask_dir is not None else None
        samples.append(Sample(path, label, defect_type, (mask,) if mask else ()))
    return samples


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode (L, I;16, I, F, P, RGBA, CMYK, ...) as an (H, W, 3) uint8 array."""
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            top = max(1.0, float(array.max(initial=0)))
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode in ("P", "PA", "LA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


def check_pixels(image: Image.Image, path: Path, max_pixels: int) -> None:
    """Refuse, from the header alone, an image declaring more pixels than `max_pixels` (a decompression bomb
    or a wrong file): decoding it could take gigabytes."""
    if image.width * image.height > max_pixels:
        raise DatasetError(
            f"{path} declares {image.width}x{image.height} = {image.width * image.height / 1e6:.0f} Mpx, above "
            f"--data.max_image_pixels {max_pixels / 1e6:.0f} Mpx; raise the limit if the image is genuine"
        )


# 8-bit-or-less PNGs decode through libspng (pyspng), twice as fast as libpng on large images, with the pixels
# Pillow decodes (PNG is lossless; a test checks every mode). 16-bit PNGs keep Pillow's exact scaling.
_SPNG_RGB_MODES = ("1", "L", "P", "LA", "RGB", "RGBA")  # what Pillow opens PNGs of 8 bits or fewer as
_SPNG_RAW_MODES = ("L", "LA", "RGB", "RGBA")  # masks: sample values as stored, as np.asarray(Pillow image) gives


def _read_pillow_or_spng(path: Path, image: Image.Image, spng_format: str | None, modes: Sequence[str]) -> np.ndarray:
    if image.format == "PNG" and image.mode in modes:
        data = path.read_bytes()
        if data[24] <= 8:  # IHDR bit depth; Pillow shows 16-bit RGB as mode RGB too
            import pyspng  # a C extension: loads in a millisecond, but only readers need it

            return pyspng.load(data, format=spng_format)
    return to_rgb_array(image) if spng_format == "RGB" else np.asarray(image)


def _resize(array: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 to `size` with torch's uint8 kernels: bilinear with antialias matches Pillow's
    full resampling to one grey level, at a fifth of its cost; nearest-exact picks the pixels Pillow's NEAREST picks."""
    if array.shape[:2] == tuple(size):
        return array
    planes = torch.from_numpy(np.ascontiguousarray(array)).view(*array.shape[:2], -1).permute(2, 0, 1)[None]
    antialias = mode == "bilinear"
    resized = torch.nn.functional.interpolate(planes, size=tuple(size), mode=mode, antialias=antialias)[0]
    return resized.permute(1, 2, 0).reshape(*size, *array.shape[2:]).numpy()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(worker_id: int = 0) -> None:
    """Keep freed blocks under 256 MB in this process's heap; called in every loader worker (`init_loader_worker`)
    and by the `lit-anomaly` command for its own process, and fit to be a DataLoader `worker_init_fn`. glibc
    hands such blocks back to the kernel when they are freed and faults their pages in again when the next one
    is allocated: a decoded 5-Mpx image's 15 MB buffers (a tenth of the time to decode it), and every activation
    of a backbone's forward pass (a fifth of efficientnet_lite0's time at 32 x 256 px, 170k page faults)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")  # absent on musl, which has no such thresholds
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20)  # setting either also stops glibc's own adjustment of both
    libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20)


LOADER_WORKER_NICENESS = 10


def init_loader_worker(worker_id: int = 0) -> None:
    """A DataLoader worker's settings: freed buffers stay in its heap (`keep_freed_memory`), SIGTERM ends it as
    by default, and it decodes at a lower CPU priority (nice +10) than the process that runs the model. Where
    the threads that want a core outnumber the cores (two workers and two intra-op threads on two), a
    preempted intra-op thread stalls its partner in every parallel kernel; ranked lower, the workers take the
    time the model leaves instead (the high-resolution preset on 2 cores: 31.1 -> 29.5 s, 2.5 CPU-s fewer).
    Idle cores still go to the workers."""
    keep_freed_memory()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the command's handler (__main__.py) is for the main process
    if hasattr(os, "nice"):  # POSIX; raising one's own niceness needs no privilege
        os.nice(LOADER_WORKER_NICENESS)


def read_image(path: Path, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode `path` and resize to `size` (H, W) with antialiasing; returns (H, W, 3) uint8."""
    with Image.open(path) as image:
        check_pixels(image, path, max_pixels)
        if image.format == "JPEG":
            image.draft("RGB", (size[1], size[0]))  # decode JPEGs at reduced scale when much larger
        if image.mode == "L":  # a monochrome camera's frame: decoded and resized as one plane, then repeated
            grey = _read_pillow_or_spng(path, image, None, ("L",))
            return np.repeat(_resize(grey, size, "bilinear")[..., None], 3, axis=2)
        array = _read_pillow_or_spng(path, image, "RGB", _SPNG_RGB_MODES)
    return _resize(array, size, "bilinear")


def read_mask(paths: Sequence[Path], size: tuple[int, int]) -> np.ndarray:
    """OR of the masks at `paths` (any positive value is defect), nearest-resized to `size`: (H, W) uint8."""
    out = np.zeros(size, dtype=np.uint8)
    for path in paths:
        with Image.open(path) as mask:
            values = _read_pillow_or_spng(path, mask, None, _SPNG_RAW_MODES)
        binary = (values.max(axis=2) if values.ndim == 3 else values) > 0
        out |= _resize(binary.view(np.uint8), size, "nearest-exact")
    return out


class AnomalyDataset(Dataset):
    """Decodes samples to uint8 tensors; a decoding failure becomes an `error` entry for the main process."""

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: tuple[int, int],
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        cache: DecodeCache | None = None,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.cache = cache

    def _decode(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        files = (sample.path, *sample.masks)
        cached = self.cache.load(files, self.image_size) if self.cache is not None else None
        if cached is not None:
            return cached
        try:
            image = read_image(sample.path, self.image_size, self.max_pixels)
        except Exception as error:  # corrupt, truncated, too large or unreadable: reported by the main process
            raise DatasetError(f"cannot read image {sample.path}: {error}") from error
        try:
            mask = read_mask(sample.masks, self.image_size)
        except Exception as error:
            raise DatasetError(f"cannot read mask {', '.join(map(str, sample.masks))}: {error}") from error
        if self.cache is not None:
            self.cache.store(files, self.image_size, image, mask)
        return image, mask

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            image, mask = self._decode(sample)
        except DatasetError as error:
            return {"index": index, "path": str(sample.path), "error": str(error)}
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.tensor(sample.label, dtype=torch.long),
            "mask": torch.from_numpy(mask)[None],
            "has_mask": torch.tensor(sample.label == 0 or bool(sample.masks)),
            "index": torch.tensor(index, dtype=torch.long),
            "path": str(sample.path),
            "defect_type": sample.defect_type,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The readable items as one batch; unreadable ones under `failed` as {index, path, error}."""
    failed = [item for item in items if "error" in item]
    readable = [item for item in items if "error" not in item]
    batch = default_collate(readable) if readable else {}
    batch["failed"] = failed
    return batch


def to_float_batch(batch: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """The loader carries uint8 (4x less IPC and host-to-device traffic); models get float in [0, 1].

    `strict` raises on a batch with unreadable files (everywhere but predict)."""
    if strict and batch.get("failed"):
        raise DatasetError(batch["failed"][0]["error"])
    if "image" in batch and batch["image"].dtype == torch.uint8:
        batch["image"] = batch["image"].float().div_(255.0)
        batch["mask"] = batch["mask"].float()
    return batch


def limit_test_samples(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """A seeded subset of `limit` samples that keeps normal and anomalous images in proportion (one each at least)."""
    if limit >= len(samples):
        return samples
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for position, sample in enumerate(samples):
        groups.setdefault(sample.label, []).append(position)
    quotas = {label: max(1, round(limit * len(members) / len(samples))) for label, members in groups.items()}
    while sum(quotas.values()) > limit:  # rounding overshoot: trim the largest group
        largest = max(quotas, key=lambda label: quotas[label])
        quotas[largest] -= 1
    chosen = []
    for label, members in groups.items():
        chosen += rng.sample(members, min(quotas[label], len(members)))
    return [samples[i] for i in sorted(chosen)]


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
        resized, missing = [], []
        for sample in samples:
            try:
                with Image.open(sample.path) as image:
                    check_pixels(image, sample.path, self.max_image_pixels)
                    size = image.size
                for mask_path in sample.masks:
                    with Image.open(mask_path) as mask:
                        if mask.size != size:
                            resized.append(
                                f"{mask_path} ({mask.size[0]}x{mask.size[1]} for a {size[0]}x{size[1]} image)"
                            )
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
        if missing:
            notes["masks_missing"] = (
                f"{len(missing)} anomalous images have no ground-truth mask and are left out of the pixel "
                f"metrics, e.g. {missing[0]}"
            )
        return notes

    def _in_hidden(self, path: Path) -> bool:
        """`path` under `predict_dir` is hidden, or lies in a hidden folder there (`is_hidden`)."""
        relative = path.relative_to(self.predict_dir)
        return any(is_hidden(part) for part in (relative, *relative.parents))

    def _predict_dir_samples(self) -> list[Sample]:
        if not self.predict_dir.is_dir():
            raise DatasetError(f"--data.predict_dir {self.predict_dir} does not exist or is not a folder")
        images = [
            p
            for p in sorted(self.predict_dir.rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not self._in_hidden(p)
        ]
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
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader("predict")

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # raised here, in the main process, not as a worker's stack trace; predict goes on without the file
        if batch["failed"] and not (self.trainer is not None and self.trainer.predicting):
            raise DatasetError(batch["failed"][0]["error"])
        return batch

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return to_float_batch(batch, strict=False)
