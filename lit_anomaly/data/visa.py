"""VisA: the raw tree driven by split_csv/1cls.csv, or the common pre-converted MVTec-like layout."""

from __future__ import annotations

import csv
from pathlib import Path

from .datamodule import AnomalyDataModule
from .samples import DatasetError, Sample, labelled_folder, subfolders

SPLIT_CSV = Path("split_csv") / "1cls.csv"
CSV_COLUMNS = ("object", "split", "label", "image", "mask")


def _read_split_csv(root: Path) -> list[dict[str, str]]:
    path = root / SPLIT_CSV
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(CSV_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path}: expected header {','.join(CSV_COLUMNS)}, missing {', '.join(sorted(missing))}")
        return [{key: (value or "").strip() for key, value in row.items()} for row in reader]


class VisA(AnomalyDataModule):
    """VisA (12 categories): the raw tree driven by split_csv/1cls.csv, or the MVTec-like converted layout."""

    CATEGORIES = (
        "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
        "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
    )  # fmt: skip
    EXPECTED_TREE = """raw:       <root>/split_csv/1cls.csv   (object,split,label,image,mask)
           <root>/<category>/Data/Images/{Normal,Anomaly}/000.JPG
           <root>/<category>/Data/Masks/Anomaly/000.png
converted: <root>/<category>/{train/good,test/good,test/bad,ground_truth/bad}/"""

    @classmethod
    def categories(cls, root: str | Path) -> list[str]:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(cls._missing_root_message(root))
        if (root / SPLIT_CSV).is_file():
            return sorted({row["object"] for row in _read_split_csv(root)})
        found = [p.name for p in subfolders(root) if (p / "train" / "good").is_dir()]
        if not found:
            raise DatasetError(f"no VisA category found under {root}.\nExpected tree:\n{cls.EXPECTED_TREE}")
        return found

    @property
    def is_raw(self) -> bool:
        return (self.root / SPLIT_CSV).is_file()

    def _train_folder(self) -> Path:
        if self.is_raw:
            return self.category_root / "Data" / "Images" / "Normal"
        return self.category_root / "train" / "good"

    def _csv_samples(self, split: str) -> list[Sample]:
        samples = []
        for row in _read_split_csv(self.root):
            if row["object"] != self.category or row["split"] != split:
                continue
            anomalous = row["label"] == "anomaly"
            path = self.root / row["image"]
            if not path.is_file():
                raise DatasetError(f"{self.root / SPLIT_CSV} lists {row['image']}, but {path} does not exist")
            mask = self.root / row["mask"] if anomalous and row["mask"] else None
            masks = (mask,) if mask is not None and mask.is_file() else ()
            samples.append(Sample(path, int(anomalous), "anomaly" if anomalous else "good", masks))
        return samples

    def _train_samples(self) -> list[Sample]:
        if self.is_raw:
            return [s for s in self._csv_samples("train") if s.label == 0]
        return labelled_folder(self._train_folder(), 0, "good")

    def _test_samples(self) -> list[Sample]:
        if self.is_raw:
            return self._csv_samples("test")
        test_root = self.category_root / "test"
        return labelled_folder(test_root / "good", 0, "good") + labelled_folder(
            test_root / "bad", 1, "bad", self.category_root / "ground_truth" / "bad"
        )
