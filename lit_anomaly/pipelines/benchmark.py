"""The category loop, once: fit, calibrate and test a fresh detector per category; write the run folder."""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image
from pytorch_lightning.callbacks import Checkpoint, ModelSummary, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..callbacks import TensorBoardArtifacts
from ..data import DATAMODULES, AnomalyDataModule, DatasetError, Folder
from ..metrics import au_spro, image_metrics
from ..models import MODELS, AnomalyModule
from ..models.base import TestResult, class_path, frozen_ddp, unused_epochs_warning
from ..reporting import RunError, RunFolder, build_report, environment
from ..reporting.figures import overlay_png
from ..reporting.html import select_hard_cases
from ..reporting.run_folder import check_output_file, replace_atomic, sanitize
from ..reporting.statistics import bootstrap_intervals
from .shared_logger import finalize, for_category, share

TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "enable_progress_bar": False,
}
QUIET = (  # Lightning advice that does not apply to one-pass, optimiser-free detectors
    r".*does not have many workers.*",
    r".*configure_optimizers.*",
    r".*sync_dist.*",
    r".*The number of training batches.*",
    r".*Total length of .* across ranks is zero.*",
    r".*Using `DistributedSampler` with the dataloaders.*",
    r".*module\(s\) in eval mode.*",
    r".*treespec.*",
    r".*all_gather is deprecated.*",
)


class WithoutTips(logging.Filter):
    """Drops Lightning's "💡 Tip" lines, adverts for its cloud services printed by every Trainer (twice a
    category): noise around our own warnings, and links an air-gapped line PC cannot follow."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's advice that does not apply here (QUIET) and its tips, left out within the block."""
    tips = WithoutTips()
    loggers = [
        logging.getLogger(f"{package}.utilities.rank_zero") for package in ("pytorch_lightning", "lightning_fabric")
    ]
    with warnings.catch_warnings():
        for pattern in QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.addFilter(tips)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(tips)


@dataclass
class RunConfig:
    """Where a benchmark run's results go.

    Args:
        output_dir: write the run folder exactly here (new or empty); default <parent_dir>/<time>_<dataset>_<model>.
        save: write the run folder at all (false: only the JSON summary on stdout).
        per_image_jsonl: write categories/<category>/per_image.jsonl, one record per test image.
        output: also write a copy of the top-level report.json to this file.
        resume: continue the run in this folder: finished categories are kept, the rest run with the
            folder's own settings; settings that change results must match.
        resume_force: resume even when settings that change results differ (the report then mixes them).
        parent_dir: folder under which default run folders are made.
        checkpoints: also save each category's fitted, calibrated detector as categories/<category>/detector.ckpt.
        html: write report.html, one self-contained page (no network needed) with the summary, curves,
            score histograms and hardest cases of every category.
        html_cases: hardest cases shown per category and kind (false alarms, missed defects) in report.html.
    """

    output_dir: str | None = None
    save: bool = True
    per_image_jsonl: bool = True
    output: str | None = None
    resume: str | None = None
    resume_force: bool = False
    parent_dir: str = "runs"
    checkpoints: bool = False
    html: bool = True
    html_cases: int = 3


@dataclass
class Spec:
    """A class and its init arguments: every category gets a fresh instance built from it."""

    cls: type
    init_args: dict[str, Any]
    instance: Any = None

    @property
    def name(self) -> str:
        return self.cls.__name__

    def build(self, **overrides: Any) -> Any:
        """A fresh instance: with `overrides`, built; without, a copy of `instance`, the one built (or given)
        first. Every category then starts from the same detector, and copying is cheap where building is not
        (wide_resnet50_2's random initialisation alone takes 2 s of CPU)."""
        if overrides:
            return self.cls(**{**self.init_args, **overrides})
        if self.instance is None:
            self.instance = self.cls(**self.init_args)
        return copy.deepcopy(self.instance)

    def as_config(self) -> dict[str, Any]:
        return {"class_path": class_path(self.cls), "init_args": self.init_args}


def _resolve_class(name: str, registry: Mapping[str, type], base: type, flag: str) -> type:
    if name in registry:
        return registry[name]
    if "." in name:
        module, _, attribute = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, base):
            return cls
    raise ValueError(f"unknown {flag} {name!r}; valid: {', '.join(registry)}")


def as_spec(value: Any, registry: Mapping[str, type], base: type, flag: str) -> Spec:
    """A Spec from a name, a class, a LightningCLI-style {class_path, init_args} dict, or an instance."""
    if isinstance(value, Spec):
        return value
    if isinstance(value, base):
        init_args = {k: v for k, v in value.hparams.items() if not k.startswith("_")}  # LightningCLI's _class_path
        return Spec(type(value), init_args, value)
    if isinstance(value, type) and issubclass(value, base):
        return Spec(value, {})
    if isinstance(value, str):
        return Spec(_resolve_class(value, registry, base, flag), {})
    if isinstance(value, Mapping) and "class_path" in value:
        return Spec(_resolve_class(value["class_path"], registry, base, flag), dict(value.get("init_args") or {}))
    raise ValueError(f"{flag} must be a name ({', '.join(registry)}), a class, a config dict or an instance")


def model_spec(value: Any) -> Spec:
    return as_spec(value, MODELS, AnomalyModule, "--model")


def data_spec(value: Any) -> Spec:
    return as_spec(value, DATAMODULES, AnomalyDataModule, "--data")


def process_rank() -> int:
    """Global rank before any process group exists; 0 for plain single-process runs."""
    for variable in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return int(os.environ.get("NODE_RANK", 0)) * 100_000 + int(os.environ.get("LOCAL_RANK", 0))


# A callback that one of our defaults switches off switches it on again (Lightning refuses both): a user who
# adds a progress bar or a checkpoint callback wants it, and cannot be expected to know our defaults.
ENABLED_BY_CALLBACK = {
    "enable_checkpointing": Checkpoint,
    "enable_progress_bar": ProgressBar,
    "enable_model_summary": ModelSummary,
}


def enabled_by(callbacks: Any) -> dict[str, bool]:
    """The Trainer flags (`ENABLED_BY_CALLBACK`) that `callbacks` (one, a list or None) need switched on."""
    callbacks = callbacks if isinstance(callbacks, Sequence) else [callbacks]
    return {flag: True for flag, kind in ENABLED_BY_CALLBACK.items() if any(isinstance(c, kind) for c in callbacks)}


def trainer_kwargs(trainer: Mapping[str, Any] | None) -> dict[str, Any]:
    """Our defaults under the caller's Trainer arguments (LightningCLI passes unset ones as None)."""
    given = {k: v for k, v in (trainer or {}).items() if v is not None}
    return {**TRAINER_DEFAULTS, **given, **enabled_by(given.get("callbacks"))}


def make_trainer(
    trainer: Mapping[str, Any] | None, run_dir: Path | None, category: str, trainable: bool = False
) -> pl.Trainer:
    """A fresh Trainer for one category: our defaults under the caller's arguments, its own copies of the
    callbacks (EarlyStopping keeps state), a TensorBoard logger in the run folder."""
    kwargs = trainer_kwargs(trainer)
    if not trainable:
        kwargs["strategy"] = frozen_ddp(kwargs.get("strategy", "auto"), kwargs["devices"], kwargs.get("num_nodes", 1))
    callbacks = copy.deepcopy(list(kwargs.pop("callbacks", None) or []))
    logger = for_category(kwargs.pop("logger", True), category)
    if run_dir is not None and logger is True:
        logger = TensorBoardLogger(
            save_dir=run_dir / "tensorboard", name=sanitize(category), version="", default_hp_metric=False
        )  # a category name from the user never leads outside the run folder
        callbacks.append(TensorBoardArtifacts())
    elif logger is True:
        logger = False
    kwargs.setdefault("default_root_dir", run_dir or None)
    return pl.Trainer(logger=logger, callbacks=callbacks, **kwargs)


def save_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """The detector for `predict` and `test` as a Lightning checkpoint of its weights, threshold and arguments,
    written atomically: a kill or a full disk leaves the previous file or none. Training state (optimiser
    moments, callbacks) stays out: training resumes from Lightning's own last.ckpt, and a ModelCheckpoint's
    state made `predict` warn that its folder had changed.

    Every rank calls it (Lightning synchronises them); global rank 0 writes."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        trainer.save_checkpoint(temporary, weights_only=True)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if trainer.is_global_zero:
        replace_atomic(temporary, path)


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


def _per_image_records(
    datamodule: AnomalyDataModule, result: TestResult, threshold: float | None, category: str
) -> list[dict[str, Any]]:
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
            "threshold": threshold,
            "pred": pred,
        }
        for index, label, score, pred in zip(
            result.index.tolist(), result.label.tolist(), result.score.tolist(), predictions, strict=True
        )
    ]


def _by_defect_type(records: list[dict[str, Any]], threshold: float | None) -> dict[str, dict]:
    """Image metrics of each defect type against the good images (MVTec LOCO reports logical/structural so)."""
    types = sorted({r["defect_type"] for r in records if r["label"] == 1})
    out = {}
    for defect_type in types if len(types) > 1 else ():
        subset = [r for r in records if r["label"] == 0 or r["defect_type"] == defect_type]
        scores = torch.tensor([r["score"] for r in subset], dtype=torch.float64)
        labels = torch.tensor([r["label"] for r in subset])
        out[defect_type] = image_metrics(scores, labels, threshold)[0]
    return out


def _spro(result: TestResult, datamodule: Any, fpr_limit: float = 0.05) -> tuple[float | None, str | None]:
    """MVTec LOCO's AU-sPRO (FPR limit 0.05 as in the LOCO paper) from the gathered test maps, or (None, why)."""
    position = {int(i): p for p, i in enumerate(result.index.tolist())}
    try:
        by_image = datamodule.spro_defects(tuple(result.maps.shape[-2:]))
    except DatasetError as error:
        return None, str(error)
    defects = [(position[i], mask, area) for i, found in by_image.items() if i in position for mask, area in found]
    good = [p for p, label in enumerate(result.label.tolist()) if label == 0]
    if not defects or not good:
        return None, "needs annotated defects and good test images"
    return au_spro(result.maps, defects, good, fpr_limit), None


def run_benchmark_category(
    model: Any,
    data: Any,
    category: str,
    trainer: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    hard_cases: int = 0,
) -> dict[str, Any]:
    """Fit, calibrate and test one category; returns its report dict with the per-image records under `records`
    and the files for the run folder (overlays of the `hard_cases` hardest cases per kind) under `artifacts`.

    With `checkpoint`, the fitted and calibrated detector is saved there before testing."""
    run_dir = Path(run_dir) if run_dir is not None else None
    model, data = model_spec(model), data_spec(data)
    datamodule = data.build(category=category, **hold_out(model.cls, data.init_args))
    datamodule.setup()
    detector = model.build()
    lightning = make_trainer(trainer, run_dir, category, detector.trains_with_gradients)
    started = time.perf_counter()
    lightning.fit(detector, datamodule=datamodule)
    train_batches = lightning.num_training_batches, len(lightning.train_dataloader or ())
    if detector.trains_with_gradients:  # the final weights score the held-out normals
        lightning.validate(detector, datamodule=datamodule, verbose=False)
    fitted = time.perf_counter()
    calibration = detector.calibration
    warn = [calibration.shortfall_message(), *datamodule.data_notes.values()]
    if checkpoint is not None:
        save_checkpoint(lightning, Path(checkpoint))
    lightning.test(detector, datamodule=datamodule, verbose=False)
    tested = time.perf_counter()
    result = detector.test_result
    limits = _limits(*train_batches, len(result.label), len(datamodule.samples("test")))
    metrics, notes = dict(result.metrics), {**datamodule.data_notes, **limits, **result.notes}
    warn += limits.values()
    if "masks_empty" in result.notes:
        warn.append(result.notes["masks_empty"])
    for line in filter(None, warn) if lightning.is_global_zero else ():
        print(f"lit-anomaly: warning: {category}: {line}", file=sys.stderr)
    if hasattr(datamodule, "spro_defects"):
        metrics["pixel_spro"], why = _spro(result, datamodule)
        if why:
            notes["pixel_spro"] = why
    records = _per_image_records(datamodule, result, calibration.threshold, category)
    try:
        cases, artifacts = _hard_cases(result, records, hard_cases if lightning.is_global_zero else 0)
    except Exception as error:  # pictures for the page must never cost the category its results
        print(
            f"lit-anomaly: warning: {category}: no hard-case overlays ({type(error).__name__}: {error})",
            file=sys.stderr,
        )
        cases, artifacts = [], {}
    return {
        "category": category,
        "status": "ok",
        "error": None,
        "threshold": calibration.threshold,
        "threshold_provenance": calibration.provenance(),
        "metrics": metrics,
        "notes": notes,
        "metric_intervals": bootstrap_intervals(
            [r["score"] for r in records], [r["label"] for r in records], calibration.threshold
        ),
        "metrics_by_defect_type": _by_defect_type(records, calibration.threshold),
        "curves": result.curves,
        "hard_cases": cases,
        "counts": {
            "train": len(datamodule.samples("train")),
            "calibration": calibration.n,
            "test": len(result.label),  # what the metrics are over
            "test_anomalous": int(result.label.sum()),
        },
        "timing": {
            "fit_s": fitted - started - calibration.seconds,
            "calibrate_s": calibration.seconds,
            "test_s": tested - fitted,
        },
        "hardware": {"device": str(lightning.strategy.root_device), "world_size": lightning.world_size},
        "records": records,
        "artifacts": artifacts,
    }


def _hard_cases(
    result: TestResult, records: list[dict[str, Any]], count: int
) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The hardest test images (`select_hard_cases`) and, for each, an overlay of its anomaly map and
    ground truth; every overlay of a category shares one colour scale, from the normal images' median pixel
    score to the highest pixel score."""
    cases = select_hard_cases(records, count) if count > 0 else []
    if not cases:
        return [], {}
    position = {int(i): p for p, i in enumerate(result.index.tolist())}
    normal_maps = result.maps[result.label == 0]
    low = float((normal_maps if len(normal_maps) else result.maps)[:, ::4, ::4].median())
    value_range = (low, float(result.maps.max()))
    files, shown = {}, []
    for case in cases:
        at = position[case["index"]]
        anomaly_map = result.maps[at].float().numpy()
        mask = result.masks[at].numpy() if case["label"] == 1 else None
        image = result.images[at].permute(1, 2, 0).numpy()
        if image.shape[:2] != anomaly_map.shape:
            size = (anomaly_map.shape[1], anomaly_map.shape[0])
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        name = f"hard_cases/{case['kind']}_{case['index']}.png"
        files[name] = overlay_png(image, anomaly_map, mask, value_range)
        shown.append({**case, "file": name})
    return shown, files


def _failed(category: str, error: BaseException) -> dict[str, Any]:
    return {
        "category": category, "status": "failed", "error": f"{type(error).__name__}: {error}", "threshold": None,
        "threshold_provenance": None, "metrics": {}, "notes": {}, "counts": None, "timing": None,
    }  # fmt: skip


def run_benchmark_all(
    model: Any,
    data: Any,
    categories: Sequence[str],
    trainer: Mapping[str, Any] | None = None,
    run: RunConfig | Mapping[str, Any] | None = None,
    config_yaml: str | None = None,
) -> dict[str, Any]:
    """Run `categories` in order; a failing category is recorded and the loop goes on.

    Under DDP every rank walks the same categories in step; only global rank 0 writes files.
    """
    started = time.perf_counter()
    model, data = model_spec(model), data_spec(data)
    run = RunConfig(**run) if isinstance(run, Mapping) else run or RunConfig()
    if run.html_cases < 0:
        raise RunError(f"--run.html_cases must be 0 or more, got {run.html_cases}")
    is_zero = process_rank() == 0
    writes = is_zero and run.save
    if run.output:  # writable before the run starts, not found wanting after it
        check_output_file(run.output, "--run.output", "the report copy")
    if categories:
        _check_settings(model, data, categories[0])
    if is_zero and (unused := unused_epochs_warning(model.cls, trainer_kwargs(trainer)["max_epochs"])):
        print(f"lit-anomaly: warning: {unused}", file=sys.stderr)
    config = _plain(
        {
            "model": model.as_config(),
            "data": data.as_config(),
            "trainer": {k: v for k, v in (trainer or {}).items() if k not in ("callbacks", "logger")},
            "run": asdict(run),
        }
    )
    if run.resume:
        folder = RunFolder.resume(run.resume, data.name, model.name, writable=writes)
        config, config_yaml = folder.check_resumable(config, run.resume_force), None  # the folder keeps its config
    else:
        folder = RunFolder.create(run.output_dir, run.parent_dir, data.name, model.name, writable=writes)
        config_yaml = config_yaml or yaml.safe_dump(config, sort_keys=False)
    env = environment(device=str(trainer_kwargs(trainer)["accelerator"]))
    run_dir = folder.path if run.save else None
    folder.open(resuming=bool(run.resume))
    status = "failed"  # what a logger of the caller's is finalised with, unless the run ends
    try:
        per_category = folder.finished(categories) if run.resume else {}

        def report() -> dict[str, Any]:
            ordered = {c: per_category[c] for c in categories if c in per_category}
            wall = time.perf_counter() - started
            return build_report(data.name, model.name, categories, ordered, run_dir, config, env, wall)

        folder.write_report(report(), config_yaml, None)  # resumable even if the first category never finishes
        trainer = {**trainer, "logger": share(trainer["logger"])} if trainer and trainer.get("logger") else trainer
        with stopping_on_signals() as stopped:
            _run_categories(model, data, categories, trainer, run, folder, per_category, report, stopped)
            final = report()
            folder.write_report(final, None, run.output, run.html)
        status = "success"
    finally:
        folder.close()
        finalize((trainer or {}).get("logger"), status)
    return final


def hold_out(detector: type, data_args: Mapping[str, Any]) -> dict[str, float]:
    """The datamodule's calibration_fraction when left at its default: trained detectors calibrate on a
    10% hold-out; memory-bank detectors score every train normal out of sample instead."""
    if data_args.get("calibration_fraction") is None and detector.trains_with_gradients:
        return {"calibration_fraction": 0.1}
    return {}


def _check_settings(model: Spec, data: Spec, category: str) -> None:
    """Settings that fail every category fail here, once, before any folder is made or anything is fitted:
    the datamodule's and detector's own checks, and whether the backbone takes the image size."""
    datamodule = data.build(category=category, **hold_out(model.cls, data.init_args))
    model.build().check_image_size(datamodule.image_size)


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM (a scheduler's stop) end the category loop as KeyboardInterrupt and Lightning's
    SIGTERMException, and the signal is remembered (the yielded list).

    Remembered, because C extensions turn an exception raised while they run into their own: matplotlib's
    drawing reported Ctrl+C as "TypeError: affine_transform(): incompatible function arguments", which must
    neither pass for a failed category (and the loop go on) nor end the command as a fault. SIGTERM between
    categories, where no Trainer listens for it, ended the process without a word. Only the main thread can
    take signals; elsewhere this changes nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else SIGTERMException

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    except BaseException as error:
        if received and not isinstance(error, KeyboardInterrupt | SIGTERMException):
            raise (KeyboardInterrupt() if received[0] == signal.SIGINT else SIGTERMException()) from error
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_categories(
    model: Spec,
    data: Spec,
    categories: Sequence[str],
    trainer: Mapping[str, Any] | None,
    run: RunConfig,
    folder: RunFolder,
    per_category: dict[str, dict],
    report: Any,
    stopped: list[int],
) -> None:
    run_dir = folder.path if run.save else None
    console = Console(stderr=True)
    is_zero = process_rank() == 0
    with (
        quiet_lightning(),
        Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=not is_zero,
        ) as progress,
    ):  # fmt: skip
        task = progress.add_task("categories", total=len(categories), completed=len(per_category))
        for category in categories:
            if category in per_category:
                continue
            progress.update(task, description=category)  # the count beside it says how many are done
            try:
                checkpoint = folder.category_dir(category) / "detector.ckpt" if run_dir and run.checkpoints else None
                cases = run.html_cases if run.html and run_dir else 0
                result = run_benchmark_category(model, data, category, trainer, run_dir, checkpoint, cases)
                records, artifacts = result.pop("records"), result.pop("artifacts")
            except Exception as error:  # recorded, with its traceback for a bug report; the other categories still run
                if stopped:  # a signal's exception, disguised by a C extension
                    raise
                result, records = _failed(category, error), None
                artifacts = {"traceback.txt": "".join(traceback.format_exception(error)).encode()}
                if is_zero:
                    where = f" (traceback: {folder.category_dir(category) / 'traceback.txt'})" if run_dir else ""
                    console.print(f"[red]category {category} failed:[/red] {result['error']}{where}", highlight=False)
            per_category[category] = result
            folder.write_category(result, records if run.per_image_jsonl else None, artifacts)
            folder.write_report(report(), None, None, run.html)  # what finished is on disk even if the run dies
            progress.advance(task)
        progress.update(task, description="finished")  # not the last category's name beside a full count


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def run_benchmark(
    model: Any = "PatchCore",
    data: Any = "MVTecAD",
    category: str | None = None,
    trainer: Mapping[str, Any] | None = None,
    run: RunConfig | Mapping[str, Any] | None = None,
    config_yaml: str | None = None,
) -> dict[str, Any]:
    """One benchmark run; returns the dict written to report.json.

    `model` and `data` are names, classes, {class_path, init_args} dicts or instances (each category
    gets a fresh copy); `category` defaults to the datamodule's own and may be "all" or a comma-separated
    list ("bottle,cable").
    """
    model, data = model_spec(model), data_spec(data)
    defaults = inspect.signature(data.cls).parameters  # Folder's category, the demo's root
    category = category or data.init_args.get("category", defaults["category"].default)
    root = data.init_args.get("root", defaults["root"].default)
    for flag, value in (("--data.category", category), ("--data.root", root)):
        if value is inspect.Parameter.empty or value is None:
            raise ValueError(f"{flag} is required")
    if category == "all":
        if issubclass(data.cls, Folder):
            raise DatasetError("--data.category all is not supported by Folder: a folder holds one category")
        categories = data.cls.categories(root)
    elif issubclass(data.cls, Folder):
        categories = [category]  # only names the results
    else:
        categories = list(dict.fromkeys(name.strip() for name in category.split(",") if name.strip()))
        valid = data.cls.categories(root)
        unknown = [name for name in categories if name not in valid] or ([] if categories else [category])
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise DatasetError(f"unknown {data.name} category {names}; valid: {', '.join(valid)}")
    data.instance = None  # a datamodule instance only carries init args: every category gets a fresh one
    return run_benchmark_all(model, data, categories, trainer, run, config_yaml)
