"""`lit-anomaly`: LightningCLI with fit, validate, test, predict and fit+test (the benchmark loop), and compare."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .callbacks import PredictionWriter
from .data import DATAMODULES, AnomalyDataModule, DatasetError
from .models import MODELS, AnomalyModule
from .models.base import frozen_ddp, unused_epochs_warning
from .models.components import BackboneError
from .pipelines.benchmark import (
    TRAINER_DEFAULTS,
    RunConfig,
    enabled_by,
    hold_out,
    model_spec,
    process_rank,
    quiet_lightning,
    run_benchmark,
    save_checkpoint,
)  # fmt: skip
from .reporting import RunError

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


class CheckpointError(ValueError):
    """A --ckpt_path that is not a readable Lightning checkpoint; the message names the file."""


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path`; refused, before anything runs, if missing, a folder, truncated, empty, not a
    torch file or not Lightning's. Loaded with weights_only=True: a pickle payload never runs."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"--ckpt_path {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path {path} is not a file; expected a .ckpt written by lit-anomaly fit")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"--ckpt_path {path} is not a readable checkpoint (truncated or not one): {reason}"
        ) from error
    if not isinstance(state, dict) or "state_dict" not in state or "pytorch-lightning_version" not in state:
        raise CheckpointError(f"--ckpt_path {path} is a torch file but not a Lightning checkpoint (no state_dict)")
    return state


def with_checkpoint_classes(args: list[str], path: str, checkpoint: dict[str, Any]) -> list[str]:
    """`args` of `predict` (or `test`, `validate`) `--ckpt_path` with the detector and the dataset family (its
    root, category and image size) the checkpoint was fit with, where neither the command line nor a --config
    names them: on the line, `lit-anomaly predict --ckpt_path detector.ckpt --data.predict_dir /incoming` is
    the whole command, and `lit-anomaly test --ckpt_path detector.ckpt` tests on the category it was fit on."""
    if _flag_values(args, "--config"):
        return args
    classes, data_args = checkpoint.get("classes") or {}, checkpoint.get("datamodule_hyper_parameters") or {}
    if not classes and not (_flag_values(args, "--model") and _flag_values(args, "--data")):
        raise CheckpointError(
            f"--ckpt_path {path} does not name its detector and dataset classes (lit-anomaly before 0.2): give "
            "--config, or --model and --data, as when it was fit"
        )
    extra = ["--model", classes["model"]] if classes.get("model") and not _flag_values(args, "--model") else []
    if classes.get("data") and not _flag_values(args, "--data"):
        extra += ["--data", classes["data"]]
        for key in ("root", "category", "image_size"):
            if key in data_args:  # a string as it is: JSON's quotes stayed in the root, '"/data/line3"'
                value = data_args[key]
                extra.append(f"--data.{key}={value if isinstance(value, str) else json.dumps(value)}")
    return [args[0], *extra, *args[1:]]


def make_dumpable(parser: ArgumentParser, config: Namespace) -> None:
    """Write str Enum members that YAML's safe dumper cannot write as their values, in place, where `config`
    holds any and does not dump as it is. Such a member is the default of a str-typed argument (Lightning's
    `Timer(interval=Interval.step)`), which takes the value just as well; Lightning's CLI dumps the config to
    instantiate the model and failed. An Enum-typed argument, which jsonargparse writes by name, dumps as is
    and keeps its member."""
    if _has_str_enum(config):
        try:
            parser.dump(config, skip_none=False)
        except (yaml.YAMLError, ValueError):  # jsonargparse wraps the dumper's error in its union check's
            _enum_values(config)


def _has_str_enum(value: Any) -> bool:
    if isinstance(value, Namespace):
        value = list(vars(value).values())
    elif isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return any(_has_str_enum(item) for item in value)
    return isinstance(value, Enum) and isinstance(value, str)


def _enum_values(value: Any) -> Any:
    if isinstance(value, Namespace):
        for key, item in vars(value).items():
            setattr(value, key, _enum_values(item))
        return value
    if isinstance(value, list):
        return [_enum_values(item) for item in value]
    if isinstance(value, dict):
        return {key: _enum_values(item) for key, item in value.items()}
    return value.value if isinstance(value, Enum) and isinstance(value, str) else value


SUBCOMMANDS = {**LightningCLI.subcommands(), FIT_TEST: {"model", "datamodule"}}


class LitAnomalyCLI(LightningCLI):
    def __init__(self, *args: Any, requested: str | None = None, **kwargs: Any) -> None:
        self.requested = requested
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        """Only the subcommand the command line names, when it names one: each subcommand's parser is built from
        the signatures of the trainer, model and data classes (the other four took 0.3 s in a fresh process)."""
        return {self.requested: SUBCOMMANDS[self.requested]} if self.requested in SUBCOMMANDS else SUBCOMMANDS

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        make_dumpable(self._parser(self.subcommand), config)
        model_class = model_spec(config.model.class_path).cls if config.get("model") else None
        data_args = config.data.init_args if config.get("data") and config.data.get("init_args") else None
        if model_class is not None and data_args is not None and self.subcommand != FIT_TEST:
            for key, value in hold_out(model_class, data_args).items():  # fit+test's loop does it per category
                data_args[key] = value
        epochs = config.trainer.get("max_epochs")
        if self.subcommand == "fit" and process_rank() == 0 and (unused := unused_epochs_warning(model_class, epochs)):
            print(f"lit-anomaly: warning: {unused}", file=sys.stderr)  # fit+test's loop says it itself
        if self.subcommand == "predict" and config.trainer.get("logger") is None:
            config.trainer.logger = False  # nothing to log: its default left an empty lightning_logs/version_N
        if self.subcommand == FIT_TEST:
            # the subcommand's own config, so `lit-anomaly fit+test --config config.yaml` reruns it
            self._config_yaml = self._parser(FIT_TEST).dump(config, skip_none=False)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        strategy = config.get("strategy", "auto")
        kwargs.update(enabled_by(config.get("callbacks")))
        if not self.model.trains_with_gradients:
            kwargs["strategy"] = frozen_ddp(strategy, config.get("devices", 1), config.get("num_nodes", 1))
        trainer = super().instantiate_trainer(**kwargs)
        if isinstance(trainer, AnomalyTrainer):
            trainer.init_kwargs["strategy"] = strategy  # each category's trainer converts it anew
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
        if self.model.trains_with_gradients:  # the final weights score the held-out normals
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "checkpoints" / "detector.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.trainer, path)
        calibration = self.model.calibration
        if self.trainer.is_global_zero:
            if calibration is not None and (shortfall := calibration.shortfall_message()):
                print(f"lit-anomaly: warning: {shortfall}", file=sys.stderr)
            print(f"lit-anomaly: checkpoint with calibrated threshold saved to {path}", file=sys.stderr)


def _flag_values(args: Sequence[str], flag: str) -> list[str]:
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]
    return values + [arg.partition("=")[2] for arg in args if arg.startswith(flag + "=")]


def _check_class_names(args: Sequence[str]) -> None:
    """Unknown --model/--data names get one line listing the valid ones (before jsonargparse's long usage)."""
    for flag, registry in (("--model", MODELS), ("--data", DATAMODULES)):
        for value in _flag_values(args, flag):
            is_name = value.isidentifier()  # not a dotted class path, a dict or a file
            if is_name and value not in registry:
                raise ValueError(f"unknown {flag} {value!r}; valid: {', '.join(registry)}")


INPUT_ERRORS = (ArgumentError, ValueError, BackboneError, RunError, FileNotFoundError, MisconfigurationException)


def _parse_error(chain: list[BaseException], args: Sequence[str]) -> str | None:
    """jsonargparse's nested union report, as one line naming the flag: `--model.x: got 'abc', expected float`."""
    for error in chain:
        if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
            config = (_flag_values(args, "--config") or ["config"])[-1]
            mark = error.problem_mark
            return f"--config {config}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    keys = []
    for error in chain:
        match = re.match(r'Parser key "([^"]+)"', str(error))
        if match and (not keys or keys[-1] != match.group(1)):
            keys.append(match.group(1))
    if not keys:
        return None
    innermost = str(chain[-1])
    given = re.search(r"Got value: (.*)$", innermost)
    subtypes = [re.findall(r"Subtypes: \[(.*)\]", str(e)) for e in chain]
    expected = next((found[-1] for found in reversed(subtypes) if found), None)
    if expected:
        expected = " or ".join(re.sub(r"<class '([\w.]+)'>", r"\1", t).strip() for t in expected.split(", "))
    flag = "--" + ".".join(keys)
    if given and expected:
        return f"{flag}: got {given.group(1)!r}, expected {expected}"
    return f"{flag}: {innermost.splitlines()[0]}"


def _message(error: BaseException, args: Sequence[str] = ()) -> str:
    """Our own error's message where there is one, else the flag and value jsonargparse choked on, else the
    root cause's first line: jsonargparse wraps a constructor's error in a long union report."""
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 50:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    ours = next((e for e in chain if isinstance(e, (DatasetError, BackboneError, RunError, CheckpointError))), None)
    if ours is None:
        ours = next((e for e in chain if type(e) is ValueError and str(e).startswith("--")), None)
    if ours is not None:
        text = str(ours).strip()
        return text if isinstance(ours, DatasetError) else text.splitlines()[0]
    parsed = _parse_error(chain, args)
    if parsed:
        return parsed
    root = chain[-1]
    if missing := re.match(r"the following arguments are required: (.*)", str(root)):
        flags = " and ".join(f"--{name.split('.', 1)[-1]}" for name in missing.group(1).split(", "))
        return f"{flags} required (or a --config that gives them)"
    text = (str(root).strip().splitlines() or [""])[0]
    return text if text and isinstance(root, INPUT_ERRORS) else f"{type(root).__name__}: {text}".rstrip(": ")


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
    json_stream = sys.stdout
    printing_config = any(a.startswith("--print_config") for a in args) or "-h" in args or "--help" in args
    if not printing_config:
        sys.stdout = sys.stderr  # Lightning's tables and progress bars must not corrupt the JSON on stdout
    try:
        _check_class_names(args)
        for path in _flag_values(args, "--ckpt_path"):  # LightningCLI reads it before any hook of ours runs
            checkpoint = check_checkpoint(path)
            if args[0] in ("predict", "test", "validate"):
                args = with_checkpoint_classes(args, path, checkpoint)
        if from_argv:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv = [sys.argv[0], *args]
        with quiet_lightning():
            cli = _cli(None if from_argv else args, args[0] if args else None)
    except SIGTERMException:  # a SystemExit without a code: re-raised, it ended the process with status 0
        return _fail(f"terminated (SIGTERM); {KEPT}", 128 + signal.SIGTERM)
    except SystemExit as exit_:  # --help (0); Lightning's graceful shutdown after Ctrl+C (1)
        if not exit_.code:
            raise
        return _fail(f"interrupted; {KEPT}", 130)
    except KeyboardInterrupt:
        return _fail(f"interrupted; {KEPT}", 130)
    except INPUT_ERRORS as error:
        return _fail(_message(error, args), 2, error if verbose else None)
    except Exception as error:
        return _fail(_message(error, args), 1, error if verbose else None)
    finally:
        sys.stdout = json_stream
    writer = next((c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter)), None)
    if cli.subcommand == "predict" and writer is not None and writer.failed:  # totals over all ranks
        message = f"{writer.failed} of {writer.written} images could not be read; see {writer.output_dir}"
        return _fail(message, 1) if process_rank() == 0 else 1
    report = cli.trainer.benchmark_report if isinstance(cli.trainer, AnomalyTrainer) else None
    if report is None:
        return 0
    if process_rank() == 0:
        json_stream.write(json.dumps(report, default=str) + "\n")
        json_stream.flush()
    return 1 if any(r["status"] != "ok" for r in report["per_category"].values()) else 0


def _compare(args: Sequence[str], verbose: bool) -> int:
    """`lit-anomaly compare RUN_DIR RUN_DIR ... [--output FILE]` (see reporting/compare.py)."""
    from .reporting.compare import main as compare

    try:
        return compare(args)
    except RunError as error:
        return _fail(str(error), 2, error if verbose else None)


def _fail(message: str, status: int, error: BaseException | None = None) -> int:
    if error is not None:
        traceback.print_exception(error, file=sys.stderr)
    print(f"lit-anomaly: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
