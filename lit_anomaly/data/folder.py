"""A user's own folder: train/<normal>/, test/<normal>/, test/<defect>/, optional ground_truth/<defect>/."""

from __future__ import annotations

from pathlib import Path

from .datamodule import AnomalyDataModule
from .samples import DatasetError, Sample, labelled_folder, subfolders

NORMAL_NAMES = ("good", "normal", "ok")


def _normal_folder(parent: Path) -> Path | None:
    for child in subfolders(parent):
        if child.name.lower() in NORMAL_NAMES:
            return child
    return None


class Folder(AnomalyDataModule):
    """Your own images: train/good (or normal, ok), test/good and test/<defect>, optional ground_truth/<defect>.

    Args:
        root: the dataset folder itself (it holds train/ and test/).
        category: only names the results (default "custom"); `all` is not supported.
        **kwargs: the arguments every datamodule takes (image_size, batch sizes, limits, ...).
    """

    EXPECTED_TREE = """<root>/train/{good|normal|ok}/*.png|jpg|jpeg|bmp|tif|tiff
<root>/test/{good|normal|ok}/...
<root>/test/<defect>/...
<root>/ground_truth/<defect>/<stem>_mask.png or <stem>.png   (optional)"""

    def __init__(self, root: str | Path, category: str = "custom", **kwargs) -> None:
        super().__init__(root, category, **kwargs)

    @classmethod
    def categories(cls, root: str | Path) -> list[str]:
        return ["custom"]

    @property
    def category_root(self) -> Path:
        return self.root

    def _check_category(self) -> None:
        if self.category == "all":
            raise DatasetError("--data.category all is not supported by Folder: a folder holds one category")
        if not (self.root / "train").is_dir():
            raise DatasetError(self._missing_root_message(self.root / "train"))

    def _no_test_images(self) -> str:
        return f"missing test folder {self.root / 'test'}, needed to test.\nExpected tree:\n{self.EXPECTED_TREE}"

    def _train_folder(self) -> Path:
        return _normal_folder(self.root / "train") or self.root / "train" / "good"

    def _train_samples(self) -> list[Sample]:
        return labelled_folder(self._train_folder(), 0, "good")

    def _test_samples(self) -> list[Sample]:
        test_root = self.root / "test"
        if not test_root.is_dir():
            return []  # fitting needs no test images; testing says what is missing (`_no_test_images`)
        normal = _normal_folder(test_root)
        samples = labelled_folder(normal, 0, "good") if normal else []
        for folder in (p for p in subfolders(test_root) if p != normal):
            samples += labelled_folder(folder, 1, folder.name, self.root / "ground_truth" / folder.name)
        return samples
