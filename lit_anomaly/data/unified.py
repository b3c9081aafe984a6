"""Several categories of one dataset as one datamodule, so that a unified run fits one detector on all of them."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from .datamodule import AnomalyDataModule
from .samples import DatasetError

FIT_SPLITS = ("train", "calibration")


class UnifiedDataModule(AnomalyDataModule):
    """The union of several categories' train and calibration normals: one detector fits on all of them.

    Each category holds out its own calibration share and applies its own limits, as it would alone, so each
    can be calibrated on its own normals (`sample_categories` names the category of every sample). Tests and
    predictions stay per category, on the members themselves.

    Args:
        members: one datamodule per category, of one dataset family, built with the same settings.
    """

    def __init__(self, members: Sequence[AnomalyDataModule]) -> None:
        if not members:
            raise DatasetError("a unified run needs at least one category")
        first = members[0]
        if len({type(member) for member in members}) > 1:
            raise DatasetError("a unified run's categories must come from one dataset family")
        base = inspect.signature(AnomalyDataModule.__init__).parameters
        names = ",".join(member.category for member in members)
        super().__init__(**{k: v for k, v in first.hparams.items() if k in base and k != "category"}, category=names)
        # what a checkpoint records: the family's own settings, so `predict --ckpt_path` builds the family
        self.remove_ignored_hparams(["members"])
        self.hparams.update({**first.hparams, "category": names})
        self.members = list(members)
        self.family = type(first)

    @property
    def calibration_source(self) -> str | None:
        return next((source for m in self.members if (source := m.calibration_source) is not None), None)

    def setup(self, stage: str | None = None) -> None:
        if "train" in self.splits:
            return
        for member in self.members:
            member.setup()
        self.splits = {split: [s for m in self.members for s in m.samples(split)] for split in FIT_SPLITS}
        self.splits.update(test=[], predict=[])

    def sample_categories(self, split: str) -> list[str]:
        """The category of each sample of `split` (train or calibration), in the split's order."""
        return [member.category for member in self.members for _ in member.samples(split)]

    def _no_test_images(self) -> str:
        return "a unified datamodule only fits: test and predict on each category's own datamodule"
