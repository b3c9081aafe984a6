"""BTAD (beanTech), as extracted: bmp or png, optionally nested under BTech_Dataset_transformed/."""

from __future__ import annotations

from pathlib import Path

from .datamodule import AnomalyDataModule
from .samples import Sample, labelled_folder

NESTED = "BTech_Dataset_transformed"


def _dataset_root(root: Path) -> Path:
    return root / NESTED if (root / NESTED).is_dir() else root


class BTAD(AnomalyDataModule):
    """BTAD (categories 01, 02, 03) as distributed: train/ok, test/ok, test/ko, ground_truth/ko."""

    CATEGORIES = ("01", "02", "03")
    EXPECTED_TREE = f"""<root>/<category>/train/ok/0000.bmp|png
<root>/<category>/test/ok/0000.bmp|png
<root>/<category>/test/ko/0000.bmp|png
<root>/<category>/ground_truth/ko/0000.png      (same stem as the image)
(<root> may also be the folder that holds {NESTED}/)"""

    @classmethod
    def categories(cls, root: str | Path) -> list[str]:
        return super().categories(_dataset_root(Path(root)))

    @property
    def category_root(self) -> Path:
        return _dataset_root(self.root) / self.category

    def _train_folder(self) -> Path:
        return self.category_root / "train" / "ok"

    def _train_samples(self) -> list[Sample]:
        return labelled_folder(self._train_folder(), 0, "good")

    def _test_samples(self) -> list[Sample]:
        test_root = self.category_root / "test"
        return labelled_folder(test_root / "ok", 0, "good") + labelled_folder(
            test_root / "ko", 1, "ko", self.category_root / "ground_truth" / "ko"
        )
