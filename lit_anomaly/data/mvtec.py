"""MVTec AD, MVTec AD 2 and MVTec LOCO AD, read exactly as distributed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .datamodule import AnomalyDataModule
from .samples import DatasetError, Sample, labelled_folder, list_images, subfolders


def _test_folders(test_root: Path, mask_root: Path) -> list[Sample]:
    """`test/good` as normals, every other folder under `test/` as a defect type with masks in `mask_root`."""
    samples = labelled_folder(test_root / "good", 0, "good")
    for folder in (p for p in subfolders(test_root) if p.name != "good"):
        samples += labelled_folder(folder, 1, folder.name, mask_root / folder.name)
    return samples


class MVTecAD(AnomalyDataModule):
    """MVTec AD (15 categories) as distributed: train/good, test/<defect>, ground_truth/<defect>/*_mask.png."""

    CATEGORIES = (
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
        "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
    )  # fmt: skip
    EXPECTED_TREE = """<root>/<category>/train/good/000.png
<root>/<category>/test/good/000.png
<root>/<category>/test/<defect>/000.png
<root>/<category>/ground_truth/<defect>/000_mask.png"""

    def _train_samples(self) -> list[Sample]:
        return labelled_folder(self._train_folder(), 0, "good")

    def _test_samples(self) -> list[Sample]:
        test_root = self.category_root / "test"
        if not test_root.is_dir():
            raise DatasetError(f"missing test folder {test_root}.\nExpected tree:\n{self.EXPECTED_TREE}")
        return _test_folders(test_root, self.category_root / "ground_truth")


def _discover(cls: type[AnomalyDataModule], root: Path) -> list[str]:
    if not root.is_dir():
        raise DatasetError(cls._missing_root_message(root))
    found = [p.name for p in subfolders(root) if (p / "train" / "good").is_dir()]
    if not found:
        raise DatasetError(f"no {cls.__name__} category found under {root}.\nExpected tree:\n{cls.EXPECTED_TREE}")
    return found


class MVTecAD2(AnomalyDataModule):
    """MVTec AD 2: `validation/good` adds calibration normals; private test splits are unlabelled and only predicted.

    Args:
        root: folder that holds the categories, laid out as distributed.
        category: category folder name under root; with fit+test also `all` or a list such as `bottle,cable`.
        predict_split: what `predict` scores: test_public, test_private or test_private_mixed.
        **kwargs: the arguments every datamodule takes (image_size, batch sizes, limits, ...).
    """

    CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
    PREDICT_SPLITS = ("test_public", "test_private", "test_private_mixed")
    EXPECTED_TREE = """<root>/<category>/train/good/000_regular.png
<root>/<category>/validation/good/000_regular.png
<root>/<category>/test_public/good/000_regular.png
<root>/<category>/test_public/bad/000_regular.png
<root>/<category>/test_public/ground_truth/bad/000_regular_mask.png
<root>/<category>/test_private/000.png
<root>/<category>/test_private_mixed/000.png"""

    def __init__(self, root: str | Path, category: str, predict_split: str = "test_public", **kwargs) -> None:
        super().__init__(root, category, **kwargs)
        if predict_split not in self.PREDICT_SPLITS:
            raise DatasetError(
                f"--data.predict_split must be one of {', '.join(self.PREDICT_SPLITS)}, got {predict_split!r}"
            )
        self.predict_split = predict_split

    @classmethod
    def categories(cls, root: str | Path) -> list[str]:
        return _discover(cls, Path(root))

    def _train_samples(self) -> list[Sample]:
        return labelled_folder(self._train_folder(), 0, "good")

    def _calibration_samples(self) -> list[Sample] | None:
        return labelled_folder(self.category_root / "validation" / "good", 0, "good") or None

    def _test_samples(self) -> list[Sample]:
        public = self.category_root / "test_public"
        return labelled_folder(public / "good", 0, "good") + labelled_folder(
            public / "bad", 1, "bad", public / "ground_truth" / "bad"
        )

    def _predict_samples(self) -> list[Sample]:
        if self.predict_split == "test_public":
            return self._test_samples()
        return [Sample(p, -1, "unknown") for p in list_images(self.category_root / self.predict_split)]


class MVTecLOCO(AnomalyDataModule):
    """MVTec LOCO AD: logical and structural anomalies; each anomalous image has a folder of masks, one per
    annotated defect, OR-ed into one mask; `validation/good` adds calibration normals; AU-sPRO is reported."""

    CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
    DEFECT_TYPES = ("logical_anomalies", "structural_anomalies")
    EXPECTED_TREE = """<root>/<category>/train/good/000.png
<root>/<category>/validation/good/000.png
<root>/<category>/test/{good,logical_anomalies,structural_anomalies}/000.png
<root>/<category>/ground_truth/{logical_anomalies,structural_anomalies}/000/000.png
<root>/<category>/defects_config.json"""

    def _train_samples(self) -> list[Sample]:
        return labelled_folder(self._train_folder(), 0, "good")

    def _calibration_samples(self) -> list[Sample] | None:
        return labelled_folder(self.category_root / "validation" / "good", 0, "good") or None

    def _test_samples(self) -> list[Sample]:
        test_root = self.category_root / "test"
        samples = labelled_folder(test_root / "good", 0, "good")
        for defect_type in self.DEFECT_TYPES:
            for path in list_images(test_root / defect_type):
                masks = tuple(list_images(self.category_root / "ground_truth" / defect_type / path.stem))
                samples.append(Sample(path, 1, defect_type, masks))
        return samples

    def spro_defects(self, size: tuple[int, int]) -> dict[int, list[tuple[torch.Tensor, float]]]:
        """Per test image, each annotated defect as (mask at `size`, saturation area at `size`).

        Each mask PNG holds one `pixel_value`, the key into defects_config.json; the saturation area
        is `int(threshold * area)` when relative, else `min(threshold, area)`, in pixels of `size`.
        """
        config_path = self.category_root / "defects_config.json"
        if not config_path.is_file():
            raise DatasetError(f"sPRO needs {config_path}")
        config = {entry["pixel_value"]: entry for entry in json.loads(config_path.read_text())}
        defects: dict[int, list[tuple[torch.Tensor, float]]] = {}
        for index, sample in enumerate(self.samples("test")):
            for path in sample.masks:
                values = np.asarray(Image.open(path))
                present = [int(v) for v in np.unique(values) if v]
                if not present:
                    continue
                if present[0] not in config:
                    raise DatasetError(f"{path}: pixel value {present[0]} is not in {config_path}")
                entry = config[present[0]]
                binary = Image.fromarray(values == present[0]).resize((size[1], size[0]), Image.NEAREST)
                mask = torch.from_numpy(np.array(binary))  # a copy: asarray is a read-only view of the image
                area = float(mask.sum())
                scale = size[0] * size[1] / values.size
                threshold = entry["saturation_threshold"]
                saturation = int(threshold * area) if entry["relative_saturation"] else min(threshold * scale, area)
                if area > 0:
                    defects.setdefault(index, []).append((mask, saturation))
        return defects


__all__ = ["MVTecAD", "MVTecAD2", "MVTecLOCO"]
