"""ResultCollector: keeps the calibration and test result a detector hands on, for whoever runs the Trainer."""

from __future__ import annotations

import pytorch_lightning as pl

from ..metrics.calibration import Calibration
from ..metrics.evaluation import TestResult


class ResultCollector(pl.Callback):
    """Keeps the last calibration and test result a detector hands to its `ResultListener` callbacks.

    The category pipeline and the CLI add one to each Trainer they build; in Python, pass your own and read
    `calibration` and `test_result` after `trainer.fit` and `trainer.test`.
    """

    def __init__(self) -> None:
        self.calibration: Calibration | None = None
        self.test_result: TestResult | None = None

    def on_calibration(self, trainer: pl.Trainer, calibration: Calibration) -> None:
        self.calibration = calibration

    def on_test_result(self, trainer: pl.Trainer, result: TestResult) -> None:
        self.test_result = result


def result_collector(trainer: pl.Trainer) -> ResultCollector:
    """The trainer's ResultCollector, added if it has none."""
    found = next((c for c in trainer.callbacks if isinstance(c, ResultCollector)), None)
    if found is None:
        found = ResultCollector()
        trainer.callbacks.append(found)
    return found
