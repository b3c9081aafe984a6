"""The category loop, once: fit, calibrate and test a fresh detector per category; write the run folder."""

from __future__ import annotations

import inspect
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..data import DatasetError, Folder
from ..reporting import RunFolder, build_report, environment
from ..runtime.files import RunError, check_output_file
from ..utils.distributed import process_rank
from ..utils.process import quiet_lightning, stopping_on_signals
from .category import CategoryOutcome, category_datamodule, failed_category, run_benchmark_category, test_category
from .shared_logger import finalize, share
from .specs import Spec, data_spec, model_spec
from .trainer import trainer_kwargs, unused_epochs_warning, warn
from .unified import UnifiedFit


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
        unified: fit one detector on the train normals of all the run's categories together, then test it on
            each; each category gets its own threshold (on its own normals) and report.json also carries the
            class-agnostic one. Saved as unified/detector.ckpt, so --run.resume tests on without refitting.
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
    unified: bool = False


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
    warn([unused_epochs_warning(model.cls, trainer_kwargs(trainer)["max_epochs"])])
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
        trainer = {**trainer, "logger": share(trainer["logger"])} if trainer and trainer.get("logger") else trainer
        earlier = (folder.read_report() or {}).get("unified") if run.resume else None
        unified = UnifiedFit(model, data, categories, trainer, run_dir, earlier) if run.unified else None

        def report() -> dict[str, Any]:
            ordered = {c: per_category[c] for c in categories if c in per_category}
            wall = time.perf_counter() - started
            summary = unified.summary if unified else None
            return build_report(data.name, model.name, categories, ordered, run_dir, config, env, wall, summary)

        def run_category(category: str) -> CategoryOutcome:
            cases = run.html_cases if run.html and run_dir else 0
            if unified is None:
                checkpoint = folder.category_dir(category) / "detector.ckpt" if run_dir and run.checkpoints else None
                return run_benchmark_category(model, data, category, trainer, run_dir, checkpoint, cases)
            fresh = not unified.ready
            fitted = unified.fitted()
            if fresh:  # the class-agnostic threshold is on disk even if the first test dies
                folder.write_report(report(), None, None)
            return test_category(fitted, unified.datamodule(category), category, trainer, run_dir, cases)

        folder.write_report(report(), config_yaml, None)  # resumable even if the first category never finishes
        with stopping_on_signals() as stopped:
            _run_categories(categories, run, folder, per_category, report, stopped, run_category)
            final = report()
            folder.write_report(final, None, run.output, run.html)
        status = "success"
    finally:
        folder.close()
        finalize((trainer or {}).get("logger"), status)
    return final


def _check_settings(model: Spec, data: Spec, category: str) -> None:
    """Settings that fail every category fail here, once, before any folder is made or anything is fitted:
    the datamodule's and detector's own checks, and whether the backbone takes the image size."""
    model.build().check_image_size(category_datamodule(model, data, category).image_size)


def _run_categories(
    categories: Sequence[str],
    run: RunConfig,
    folder: RunFolder,
    per_category: dict[str, dict],
    report: Callable[[], dict[str, Any]],
    stopped: list[int],
    run_category: Callable[[str], CategoryOutcome],
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
                outcome = run_category(category)
            except Exception as error:  # recorded, with its traceback for a bug report; the other categories still run
                if stopped:  # a signal's exception, disguised by a C extension
                    raise
                trace = "".join(traceback.format_exception(error)).encode()
                outcome = CategoryOutcome(failed_category(category, error), None, {"traceback.txt": trace})
                if is_zero:
                    where = f" (traceback: {folder.category_dir(category) / 'traceback.txt'})" if run_dir else ""
                    message = outcome.report["error"]
                    console.print(f"[red]category {category} failed:[/red] {message}{where}", highlight=False)
            per_category[category] = outcome.report
            folder.write_category(outcome.report, outcome.records if run.per_image_jsonl else None, outcome.artifacts)
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
