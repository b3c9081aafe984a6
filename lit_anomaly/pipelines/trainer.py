"""The one place that builds Trainers, and the rules the CLI's subcommands and the category loop share."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, ModelSummary, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger

from ..callbacks import ResultCollector, TensorBoardArtifacts, result_collector
from ..metrics.calibration import Calibration
from ..models import AnomalyModule
from ..runtime.files import replace_atomic, sanitize
from ..utils.distributed import frozen_ddp, process_rank
from .shared_logger import for_category

TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "enable_progress_bar": False,
}

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


def detector_strategy(detector: type[AnomalyModule] | AnomalyModule, kwargs: Mapping[str, Any]) -> Any:
    """The strategy for a Trainer of `detector`: a gradient-free detector gets DDP that leaves it unwrapped."""
    strategy = kwargs.get("strategy", "auto")
    if detector.trains_with_gradients:
        return strategy
    return frozen_ddp(strategy, kwargs.get("devices", 1), kwargs.get("num_nodes", 1))


def make_trainer(
    trainer: Mapping[str, Any] | None, run_dir: Path | None, category: str, detector: AnomalyModule
) -> pl.Trainer:
    """A fresh Trainer for one category: our defaults under the caller's arguments, its own copies of the
    callbacks (EarlyStopping keeps state), a ResultCollector, and a TensorBoard logger in the run folder."""
    kwargs = trainer_kwargs(trainer)
    kwargs["strategy"] = detector_strategy(detector, kwargs)
    callbacks = [*copy.deepcopy(list(kwargs.pop("callbacks", None) or [])), ResultCollector()]
    logger = for_category(kwargs.pop("logger", True), category)
    if run_dir is not None and logger is True:
        logger = TensorBoardLogger(
            save_dir=run_dir / "tensorboard", name=sanitize(category), version="", default_hp_metric=False
        )
        callbacks.append(TensorBoardArtifacts())
    elif logger is True:
        logger = False
    kwargs.setdefault("default_root_dir", run_dir or None)
    return pl.Trainer(logger=logger, callbacks=callbacks, **kwargs)


def hold_out(detector: type, data_args: Mapping[str, Any]) -> dict[str, float]:
    """The datamodule's calibration_fraction when left at its default: trained detectors calibrate on a
    10% hold-out; memory-bank detectors score every train normal out of sample instead."""
    if data_args.get("calibration_fraction") is None and detector.trains_with_gradients:
        return {"calibration_fraction": 0.1}
    return {}


def finish_fit(
    trainer: pl.Trainer, detector: AnomalyModule, datamodule: pl.LightningDataModule, checkpoint: Path | None
) -> Calibration | None:
    """After `trainer.fit`: a trained detector's final weights score the held-out normals (a validate run) to
    calibrate; then the fitted, calibrated detector is saved to `checkpoint`, if given. Returns the calibration."""
    collector = result_collector(trainer)
    if not bool(detector.fitted):
        raise ValueError(
            f"--trainer.max_epochs {trainer.max_epochs}, --trainer.max_steps {trainer.max_steps} and "
            f"--trainer.limit_train_batches {trainer.limit_train_batches} left {type(detector).__name__} without "
            "a single training step, so it is not fitted; give at least one epoch and one batch"
        )
    if detector.trains_with_gradients:
        trainer.validate(detector, datamodule=datamodule, verbose=False)
    if checkpoint is not None:
        save_checkpoint(trainer, checkpoint)
    return collector.calibration


def save_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """The detector for `predict` and `test` as a Lightning checkpoint of its weights, threshold and arguments,
    written atomically: a kill or a full disk leaves the previous file or none. Training state (optimiser
    moments, callbacks) stays out: training resumes from Lightning's own last.ckpt.

    Every rank calls it (Lightning synchronises them); global rank 0 writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        trainer.save_checkpoint(temporary, weights_only=True)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if trainer.is_global_zero:
        replace_atomic(temporary, path)


def unused_epochs_warning(detector: type | None, max_epochs: Any) -> str | None:
    """What to tell a user who asked a detector that fits in one pass for more epochs (`setup` sets one)."""
    if detector is None or getattr(detector, "trains_with_gradients", True) or max_epochs in (None, 1):
        return None
    return f"{detector.__name__} fits in one pass over train: --trainer.max_epochs {max_epochs} is not used"


def warn(lines: Iterable[str | None], category: str | None = None) -> None:
    """Each line as one `lit-anomaly: warning:` line on stderr, from global rank 0 only."""
    if process_rank() != 0:
        return
    prefix = f"{category}: " if category else ""
    for line in filter(None, lines):
        print(f"lit-anomaly: warning: {prefix}{line}", file=sys.stderr)
