"""One category: fit, calibrate and test a fresh detector, and hand back its report, records and files."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..callbacks import result_collector
from ..data import AnomalyDataModule, DatasetError
from ..metrics.calibration import Calibration
from ..metrics.evaluation import TestResult, extra_metrics
from ..models import AnomalyModule
from ..reporting.hard_cases import hard_case_overlays
from .specs import Spec, data_spec, model_spec
from .trainer import finish_fit, hold_out, make_trainer, warn


@dataclass
class CategoryOutcome:
    """A finished category: its report.json dict, its per-image records and the files for its folder."""

    report: dict[str, Any]
    records: list[dict[str, Any]] | None = None
    artifacts: dict[str, bytes] | None = None


def _limits(fit_batches: float, train_batches: int, scored: int, test_images: int) -> dict[str, str]:
    """Notes for a fit or test that saw part of the category (--trainer.limit_*_batches, fast_dev_run)."""
    notes = {}
    if fit_batches < train_batches:
        notes["train_batches"] = (
            f"fit on {fit_batches} of {train_batches} train batches a rank (--trainer.limit_train_batches or "
            "fast_dev_run); counts.train is the whole train split"
        )
    if scored < test_images:
        notes["test_images"] = (
            f"metrics over {scored} of {test_images} test images (--trainer.limit_test_batches or fast_dev_run)"
        )
    return notes


def per_image_records(datamodule: AnomalyDataModule, result: TestResult, category: str) -> list[dict[str, Any]]:
    """One per_image.jsonl record per test image of `result`."""
    samples = datamodule.samples("test")
    predictions = result.pred.tolist() if result.pred is not None else [None] * len(result.index)
    return [
        {
            "index": index,
            "path": str(samples[index].path),
            "category": category,
            "defect_type": samples[index].defect_type,
            "label": label,
            "score": score,
            "threshold": result.threshold,
            "pred": pred,
        }
        for index, label, score, pred in zip(
            result.index.tolist(), result.label.tolist(), result.score.tolist(), predictions, strict=True
        )
    ]


def _spro_defects(datamodule: AnomalyDataModule, result: TestResult) -> Mapping | str | None:
    """The dataset's sPRO annotations at the maps' size, the reason they cannot be read, or None without any."""
    if not hasattr(datamodule, "spro_defects"):
        return None
    try:
        return datamodule.spro_defects(tuple(result.maps.shape[-2:]))
    except DatasetError as error:
        return str(error)


@dataclass
class Fitted:
    """A fitted, calibrated detector and what its fit cost."""

    detector: AnomalyModule
    calibration: Calibration
    fit_s: float | None
    calibrate_s: float | None
    train_batches: tuple[float, int] = (0, 0)  # (batches fit on a rank, batches in the train split)


def category_datamodule(model: Spec, data: Spec, category: str) -> AnomalyDataModule:
    """A fresh datamodule of `category`, holding out what `model` calibrates on (`hold_out`)."""
    return data.build(category=category, **hold_out(model.cls, data.init_args))


def fit_detector(
    model: Any,
    datamodule: AnomalyDataModule,
    name: str,
    trainer: Mapping[str, Any] | None = None,
    run_dir: Path | None = None,
    checkpoint: Path | None = None,
) -> Fitted:
    """Fit and calibrate a fresh detector on `datamodule` (logged under `name`); with `checkpoint`, the fitted and
    calibrated detector is saved there."""
    datamodule.setup()
    detector = model_spec(model).build()
    lightning = make_trainer(trainer, run_dir, name, detector)
    started = time.perf_counter()
    lightning.fit(detector, datamodule=datamodule)
    train_batches = lightning.num_training_batches, len(lightning.train_dataloader or ())
    calibration = finish_fit(lightning, detector, datamodule, checkpoint)
    seconds = time.perf_counter() - started
    return Fitted(detector, calibration, seconds - calibration.seconds, calibration.seconds, train_batches)


def test_category(
    fitted: Fitted,
    datamodule: AnomalyDataModule,
    category: str,
    trainer: Mapping[str, Any] | None = None,
    run_dir: Path | None = None,
    hard_cases: int = 0,
) -> CategoryOutcome:
    """Test a fitted detector on one category with the threshold that decides for it, and hand back the
    category's report, records and files; with `hard_cases`, overlays of that many hardest cases per kind."""
    datamodule.setup()
    calibration = fitted.calibration.for_category(category)
    lightning = make_trainer(trainer, run_dir, category, fitted.detector)
    started = time.perf_counter()
    lightning.test(fitted.detector, datamodule=datamodule, verbose=False)
    tested = time.perf_counter()
    result = result_collector(lightning).test_result
    limits = _limits(*fitted.train_batches, len(result.label), len(datamodule.samples("test")))
    warn([calibration.shortfall_message(), *datamodule.data_notes.values(), *limits.values(),
          result.notes.get("masks_empty")], category)  # fmt: skip
    records = per_image_records(datamodule, result, category)
    extra = extra_metrics(result, [r["defect_type"] for r in records], _spro_defects(datamodule, result))
    metrics = dict(result.metrics)
    if hasattr(datamodule, "spro_defects"):
        metrics["pixel_spro"] = extra.spro
    try:
        cases, artifacts = hard_case_overlays(result, records, hard_cases if lightning.is_global_zero else 0)
    except Exception as error:  # pictures for the page must never cost the category its results
        warn([f"no hard-case overlays ({type(error).__name__}: {error})"], category)
        cases, artifacts = [], {}
    report = {
        "category": category,
        "status": "ok",
        "error": None,
        "threshold": calibration.threshold,
        "threshold_provenance": calibration.provenance(),
        "metrics": metrics,
        "notes": {**datamodule.data_notes, **limits, **result.notes, **extra.notes},
        "metric_intervals": extra.intervals,
        "metrics_by_defect_type": extra.by_defect_type,
        "curves": result.curves,
        "hard_cases": cases,
        "counts": {
            "train": len(datamodule.samples("train")),
            "calibration": calibration.n,
            "test": len(result.label),  # what the metrics are over
            "test_anomalous": int(result.label.sum()),
        },
        "timing": {"fit_s": fitted.fit_s, "calibrate_s": fitted.calibrate_s, "test_s": tested - started},
        "hardware": {"device": str(lightning.strategy.root_device), "world_size": lightning.world_size},
    }
    return CategoryOutcome(report, records, artifacts)


def run_benchmark_category(
    model: Any,
    data: Any,
    category: str,
    trainer: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    hard_cases: int = 0,
) -> CategoryOutcome:
    """Fit, calibrate and test one category; with `checkpoint`, the fitted and calibrated detector is saved
    there before testing, and with `hard_cases`, overlays of that many hardest cases per kind are made."""
    run_dir = Path(run_dir) if run_dir is not None else None
    model, data = model_spec(model), data_spec(data)
    datamodule = category_datamodule(model, data, category)
    fitted = fit_detector(model, datamodule, category, trainer, run_dir, Path(checkpoint) if checkpoint else None)
    return test_category(fitted, datamodule, category, trainer, run_dir, hard_cases)


def failed_category(category: str, error: BaseException) -> dict[str, Any]:
    """The report of a category that failed with `error`."""
    return {
        "category": category, "status": "failed", "error": f"{type(error).__name__}: {error}", "threshold": None,
        "threshold_provenance": None, "metrics": {}, "notes": {}, "counts": None, "timing": None,
    }  # fmt: skip
