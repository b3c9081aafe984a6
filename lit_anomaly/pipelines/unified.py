"""A unified run's one detector: fitted once on the union of the run's categories, or read back from its folder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..data import AnomalyDataModule, UnifiedDataModule
from ..metrics.calibration import Calibration
from ..runtime.files import RunError
from .category import Fitted, category_datamodule, fit_detector
from .specs import Spec
from .trainer import warn

UNIFIED = "unified"  # the fit's name in the run folder (unified/detector.ckpt) and in TensorBoard


class UnifiedFit:
    """The one detector of a unified run (`--run.unified true`), fitted on the train normals of every category.

    It is fitted the first time a category needs it and saved as `unified/detector.ckpt` in the run folder; a
    resumed run reads it back and tests on without fitting again. Each category is then tested with its own
    threshold (calibrated on its own out-of-sample normals); the class-agnostic one is over all of them.

    Args:
        model: the detector's spec.
        data: the dataset's spec; every category gets a datamodule of its own, as in a per-category run.
        categories: the categories fitted on together.
        trainer: the Trainer arguments of the run.
        run_dir: the run folder, or None when nothing is saved (and so nothing can be resumed).
        summary: report.json's `unified` section of the run being resumed, if any.
    """

    def __init__(
        self,
        model: Spec,
        data: Spec,
        categories: Sequence[str],
        trainer: Mapping[str, Any] | None,
        run_dir: Path | None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.data, self.categories = model, data, list(categories)
        self.trainer, self.run_dir = trainer, run_dir
        self.summary = summary
        if summary is not None:  # refused before any category runs, not as each one's failure
            self._check_fitted_on(summary["categories"])
        self._fitted: Fitted | None = None
        self._error: Exception | None = None
        self._datamodules: dict[str, AnomalyDataModule] = {}

    @property
    def checkpoint(self) -> Path | None:
        return self.run_dir / UNIFIED / "detector.ckpt" if self.run_dir is not None else None

    @property
    def ready(self) -> bool:
        return self._fitted is not None

    def datamodule(self, category: str) -> AnomalyDataModule:
        """The category's own datamodule: the one the fit read, so its files are listed and checked once."""
        if category not in self._datamodules:
            self._datamodules[category] = category_datamodule(self.model, self.data, category)
        return self._datamodules[category]

    def fitted(self) -> Fitted:
        """The fitted detector, for testing: fit or read back once; a fit that failed fails every category."""
        if self._error is not None:
            raise self._error
        if self._fitted is None:
            try:
                self._fitted = self._read() if self.checkpoint and self.checkpoint.is_file() else self._fit()
            except Exception as error:
                self._error = error
                raise
        return self._fitted

    def _fit(self) -> Fitted:
        datamodule = UnifiedDataModule([self.datamodule(c) for c in self.categories])
        fitted = fit_detector(self.model, datamodule, UNIFIED, self.trainer, self.run_dir, self.checkpoint)
        calibration = fitted.calibration
        warn([calibration.shortfall_message()], f"{UNIFIED} (class-agnostic threshold)")
        timing = {"fit_s": fitted.fit_s, "calibrate_s": fitted.calibrate_s}
        self.summary = self._summarise(calibration, len(datamodule.samples("train")), timing)
        return replace(fitted, fit_s=None, calibrate_s=None)  # the fit is shared: its time is in the summary

    def _read(self) -> Fitted:
        detector = self.model.cls.load_from_checkpoint(str(self.checkpoint), map_location="cpu")
        calibration = detector.calibration
        self._check_fitted_on(list(calibration.categories) if calibration is not None else [])
        if self.summary is None:  # killed between saving the detector and writing the report: no timing
            self.summary = self._summarise(calibration, None, None)
        return Fitted(detector, calibration, None, None)

    def _check_fitted_on(self, categories: list[str]) -> None:
        if categories != self.categories:
            raise RunError(
                f"the run's unified detector was fitted on {','.join(categories)}: resume it with --data.category "
                f"{','.join(categories)}"
            )

    def _summarise(self, calibration: Calibration, train: int | None, timing: dict | None) -> dict[str, Any]:
        """report.json's `unified` section: the categories, the class-agnostic threshold, the shared fit's cost."""
        return {
            "categories": self.categories,
            "threshold": calibration.threshold,
            "threshold_provenance": calibration.provenance(),
            "counts": {"train": train, "calibration": calibration.n},
            "timing": timing,
            "checkpoint": f"{UNIFIED}/detector.ckpt" if self.checkpoint else None,
        }
