"""`lit-anomaly`: LightningCLI with fit, validate, test, predict and fit+test (the benchmark loop), and compare."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..callbacks import PredictionWriter, ResultCollector
from ..data import AnomalyDataModule
from ..models import AnomalyModule
from ..models.checkpoints import check_checkpoint
from ..pipelines import RunConfig, run_benchmark
from ..pipelines.specs import model_spec
from ..pipelines.trainer import (
    TRAINER_DEFAULTS,
    detector_strategy,
    enabled_by,
    finish_fit,
    hold_out,
    unused_epochs_warning,
    warn,
)  # fmt: skip
from ..runtime import EngineMissing
from ..runtime.files import RunError, check_output_folder
from ..utils.distributed import process_rank
from ..utils.process import quiet_lightning
from .arguments import check_class_names, check_config_files, flag_values
from .checkpoints import with_checkpoint_classes
from .config import make_dumpable
from .errors import INPUT_ERRORS, error_message, fail

FIT_TEST = "fit+test"
KEPT = "finished categories are kept in the run folder (--run.resume DIR continues)"


class AnomalyTrainer(pl.Trainer):
    """A Trainer that remembers its arguments, so the benchmark loop can build a fresh one per category."""

    def __init__(self, **kwargs: Any) -> None:
        # Lightning appends its default callbacks to the list it is given: keep the caller's list as given
        callbacks = kwargs.get("callbacks")
        self.init_kwargs = {**kwargs, "callbacks": list(callbacks) if isinstance(callbacks, list) else callbacks}
        self.config_yaml: str | None = None
        self.benchmark_report: dict[str, Any] | None = None
        super().__init__(**kwargs)

    def fit_test(self, model: AnomalyModule, datamodule: AnomalyDataModule, run: RunConfig | None = None) -> dict:
        """Fit on train normals, calibrate the threshold on out-of-sample normal scores and test, per category.

        Args:
            model: the detector (--model PatchCore|PaDiM|...).
            datamodule: the dataset (--data MVTecAD|...); --data.category all runs every category.
            run: where results go (see --run.help RunConfig).
        """
        self.benchmark_report = run_benchmark(
            model=model, data=datamodule, trainer=self.init_kwargs, run=run or RunConfig(), config_yaml=self.config_yaml
        )
        return self.benchmark_report


setattr(AnomalyTrainer, FIT_TEST, AnomalyTrainer.fit_test)


SUBCOMMANDS = {**LightningCLI.subcommands(), FIT_TEST: {"model", "datamodule"}}


class LitAnomalyCLI(LightningCLI):
    def __init__(self, *args: Any, requested: str | None = None, **kwargs: Any) -> None:
        self.requested = requested
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        """Only the subcommand the command line names, when it names one: each subcommand's parser is built from
        the signatures of the trainer, model and data classes, and building the others is wasted start-up time."""
        return {self.requested: SUBCOMMANDS[self.requested]} if self.requested in SUBCOMMANDS else SUBCOMMANDS

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        make_dumpable(self._parser(self.subcommand), config)
        model_class = model_spec(config.model.class_path).cls if config.get("model") else None
        data_args = config.data.init_args if config.get("data") and config.data.get("init_args") else None
        if model_class is not None and data_args is not None and self.subcommand != FIT_TEST:
            for key, value in hold_out(model_class, data_args).items():  # fit+test's loop does it per category
                data_args[key] = value
        if config.trainer.get("default_root_dir"):
            check_output_folder(config.trainer.default_root_dir, "--trainer.default_root_dir")
        if self.subcommand == "fit":  # fit+test's loop says it itself
            warn([unused_epochs_warning(model_class, config.trainer.get("max_epochs"))])
        if self.subcommand == "predict" and config.trainer.get("logger") is None:
            config.trainer.logger = False  # nothing to log: its default left an empty lightning_logs/version_N
        if self.subcommand == FIT_TEST:
            # the subcommand's own config, so `lit-anomaly fit+test --config config.yaml` reruns it
            self._config_yaml = self._parser(FIT_TEST).dump(config, skip_none=False)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        kwargs.update(enabled_by(config.get("callbacks")), strategy=detector_strategy(self.model, config))
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(ResultCollector())
        if isinstance(trainer, AnomalyTrainer):
            trainer.init_kwargs["strategy"] = config.get("strategy", "auto")  # each category's trainer converts it anew
        trainer.config_yaml = getattr(self, "_config_yaml", None)
        if self.subcommand == "predict":
            if not any(isinstance(c, PredictionWriter) for c in trainer.callbacks):
                trainer.callbacks.append(PredictionWriter(str(Path(trainer.default_root_dir) / "predictions")))
            for writer in (c for c in trainer.callbacks if isinstance(c, PredictionWriter)):
                writer.check_output()
        return trainer

    def after_fit(self) -> None:
        """Save the fitted, calibrated detector (Lightning's ModelCheckpoint saves nothing without optimiser
        steps, and a trained detector is calibrated only after fit)."""
        path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "checkpoints" / "detector.ckpt"
        calibration = finish_fit(self.trainer, self.model, self.datamodule, path)
        warn([calibration.shortfall_message() if calibration is not None else None])
        if self.trainer.is_global_zero:
            print(f"lit-anomaly: checkpoint with calibrated threshold saved to {path}", file=sys.stderr)


def _cli(args: Sequence[str] | None, requested: str | None) -> LitAnomalyCLI:
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
        parser_kwargs={
            "prog": "lit-anomaly",
            "exit_on_error": False,
            "description": "lit-anomaly: unsupervised visual anomaly detection",
        },
        args=args,
        requested=requested,
    )


def main(args: Sequence[str] | None = None) -> int:
    """Entry point; stdout carries exactly one JSON document (fit+test), everything else goes to stderr.

    Every failure is one line on stderr (`--verbose` or LIT_ANOMALY_VERBOSE=1 adds the traceback): exit
    status 2 for bad input, 1 for a failed category, unreadable predict inputs or any other fault."""
    from_argv = args is None
    args = list(sys.argv[1:] if args is None else args)
    verbose = "--verbose" in args or os.environ.get("LIT_ANOMALY_VERBOSE", "0") not in ("", "0")
    args = [a for a in args if a != "--verbose"]
    if args[:1] == ["compare"]:
        return _compare(args[1:], verbose)
    if args[:1] == ["export"]:
        return _export(args[1:], verbose)
    json_stream = sys.stdout
    printing_config = any(a.startswith("--print_config") for a in args) or "-h" in args or "--help" in args
    if not printing_config:
        sys.stdout = sys.stderr  # Lightning's tables and progress bars must not corrupt the JSON on stdout
    try:
        check_class_names(args)
        check_config_files(args)
        for path in flag_values(args, "--ckpt_path"):  # LightningCLI reads it before any hook of ours runs
            checkpoint = check_checkpoint(path)
            if args[0] in ("predict", "test", "validate"):
                args = with_checkpoint_classes(args, path, checkpoint)
        if from_argv:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv = [sys.argv[0], *args]
        with quiet_lightning():
            cli = _cli(None if from_argv else args, args[0] if args else None)
    except SIGTERMException:  # a SystemExit without a code: re-raised, it would exit 0
        return fail(f"terminated (SIGTERM); {KEPT}", 128 + signal.SIGTERM)
    except SystemExit as exit_:  # --help (0); Lightning's graceful shutdown after Ctrl+C (1)
        if not exit_.code:
            raise
        return fail(f"interrupted; {KEPT}", 130)
    except KeyboardInterrupt:
        return fail(f"interrupted; {KEPT}", 130)
    except INPUT_ERRORS as error:
        return fail(error_message(error, args), 2, error if verbose else None)
    except Exception as error:
        return fail(error_message(error, args), 1, error if verbose else None)
    finally:
        sys.stdout = json_stream
    writer = next((c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter)), None)
    if cli.subcommand == "predict" and writer is not None and writer.failed:  # totals over all ranks
        message = f"{writer.failed} of {writer.written} images could not be read; see {writer.output_dir}"
        return fail(message, 1) if process_rank() == 0 else 1
    report = cli.trainer.benchmark_report if isinstance(cli.trainer, AnomalyTrainer) else None
    if report is None:
        return 0
    if process_rank() == 0:
        json_stream.write(json.dumps(report, default=str) + "\n")
        json_stream.flush()
    return 1 if any(r["status"] != "ok" for r in report["per_category"].values()) else 0


def _export(args: Sequence[str], verbose: bool) -> int:
    """`lit-anomaly export --ckpt_path FILE --format onnx|openvino --output DIR [--precision] [--check DIR]`."""
    from .export import main as export

    json_stream, sys.stdout = sys.stdout, sys.stderr  # the exporters' chatter stays off the JSON on stdout
    try:
        with quiet_lightning():
            return export(args, json_stream)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2), already printed
        return int(exit_.code or 0)
    except (*INPUT_ERRORS, EngineMissing) as error:
        return fail(error_message(error, args), 2, error if verbose else None)
    except Exception as error:
        return fail(error_message(error, args), 1, error if verbose else None)
    finally:
        sys.stdout = json_stream


def _compare(args: Sequence[str], verbose: bool) -> int:
    """`lit-anomaly compare RUN_DIR RUN_DIR ... [--output FILE]` (see reporting/compare.py)."""
    from ..reporting.compare import main as compare

    try:
        return compare(args)
    except RunError as error:
        return fail(str(error), 2, error if verbose else None)


if __name__ == "__main__":
    sys.exit(main())
