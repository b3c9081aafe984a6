"""`lit-anomaly`: LightningCLI with fit, validate, test, predict and fit+test (the benchmark loop)."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import ArgumentError
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.cli import LightningCLI

from .callbacks import PredictionWriter
from .data import DATAMODULES, AnomalyDataModule, DatasetError
from .models import MODELS, AnomalyModule
from .models.components import BackboneError
from .pipelines.benchmark import QUIET, TRAINER_DEFAULTS, RunConfig, process_rank, run_benchmark
from .reporting import RunError

FIT_TEST = "fit+test"


class AnomalyTrainer(pl.Trainer):
    """A Trainer that remembers its arguments, so the benchmark loop can build a fresh one per category."""

    def __init__(self, **kwargs: Any) -> None:
        self.init_kwargs = kwargs
        self.config_yaml: str | None = None
        self.benchmark_report: dict[str, Any] | None = None
        super().__init__(**kwargs)

    def fit_test(self, model: AnomalyModule, datamodule: AnomalyDataModule, run: RunConfig | None = None) -> dict:
        """Fit on train normals, calibrate the threshold on held-out normals and test, for one category or all."""
        self.benchmark_report = run_benchmark(
            model=model, data=datamodule, trainer=self.init_kwargs, run=run or RunConfig(), config_yaml=self.config_yaml
        )
        return self.benchmark_report


setattr(AnomalyTrainer, FIT_TEST, AnomalyTrainer.fit_test)


class LitAnomalyCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), FIT_TEST: {"model", "datamodule"}}

    def before_instantiate_classes(self) -> None:
        if self.subcommand == FIT_TEST:
            # the subcommand's own config, so `lit-anomaly fit+test --config config.yaml` reruns it
            self._config_yaml = self._parser(FIT_TEST).dump(self.config[FIT_TEST], skip_none=False)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.config_yaml = getattr(self, "_config_yaml", None)
        if self.subcommand == "predict" and not any(isinstance(c, PredictionWriter) for c in trainer.callbacks):
            trainer.callbacks.append(PredictionWriter(str(Path(trainer.default_root_dir) / "predictions")))
        return trainer

    def after_fit(self) -> None:
        """Lightning's ModelCheckpoint saves nothing without optimiser steps; a fitted detector is saved here."""
        path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "checkpoints" / "detector.ckpt"
        self.trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
        if self.trainer.is_global_zero:
            print(f"lit-anomaly: checkpoint with calibrated threshold saved to {path}", file=sys.stderr)


def _check_class_names(args: Sequence[str]) -> None:
    """Unknown --model/--data names get one line listing the valid ones (before jsonargparse's long usage)."""
    for flag, registry in (("--model", MODELS), ("--data", DATAMODULES)):
        for i, arg in enumerate(args):
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.partition("=")[2]
            else:
                continue
            is_name = value.isidentifier()  # not a dotted class path, a dict or a file
            if is_name and value not in registry:
                raise ValueError(f"unknown {flag} {value!r}; valid: {', '.join(registry)}")


def _message(error: BaseException) -> str:
    """Our own error's message where there is one, else the root cause's: jsonargparse wraps a
    constructor's error in a long union report."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    chosen = next((e for e in chain if isinstance(e, (DatasetError, BackboneError, RunError))), chain[-1])
    text = str(chosen).strip()
    return text if isinstance(chosen, DatasetError) else text.splitlines()[0] if text else type(chosen).__name__


def _cli(args: Sequence[str] | None) -> LitAnomalyCLI:
    return LitAnomalyCLI(
        AnomalyModule,
        AnomalyDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=AnomalyTrainer,
        trainer_defaults={k: v for k, v in TRAINER_DEFAULTS.items() if k != "enable_checkpointing"},
        save_config_callback=None,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False, "description": "lit-anomaly: unsupervised visual anomaly detection"},
        args=args,
    )


def main(args: Sequence[str] | None = None) -> int:
    """Entry point; stdout carries exactly one JSON document (fit+test), everything else goes to stderr."""
    from_argv = args is None
    args = list(sys.argv[1:] if args is None else args)
    json_stream = sys.stdout
    printing_config = any(a.startswith("--print_config") for a in args) or "-h" in args or "--help" in args
    if not printing_config:
        sys.stdout = sys.stderr  # Lightning's tables and progress bars must not corrupt the JSON on stdout
    try:
        for pattern in QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        _check_class_names(args)
        cli = _cli(None if from_argv else args)
    except (ArgumentError, ValueError, BackboneError, RunError, FileNotFoundError, MisconfigurationException) as error:
        print(f"lit-anomaly: error: {_message(error)}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = json_stream
    report = cli.trainer.benchmark_report if isinstance(cli.trainer, AnomalyTrainer) else None
    if report is None:
        return 0
    if process_rank() == 0:
        json_stream.write(json.dumps(report, default=str) + "\n")
        json_stream.flush()
    return 1 if any(r["status"] != "ok" for r in report["per_category"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
