"""Run folders: atomic files, report.json, per-image JSONL, aggregation over categories. Knows dicts only."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..metrics.classification import IMAGE_KEYS, PIXEL_KEYS

SCHEMA_VERSION = 1
HEADLINE_METRICS = IMAGE_KEYS + PIXEL_KEYS


class RunError(ValueError):
    """A run folder or output path that cannot be used; the message names it."""


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def to_json(document: Any) -> str:
    return json.dumps(document, indent=2, allow_nan=False, default=str) + "\n"


def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def default_run_dir(parent: Path, dataset: str, model: str) -> Path:
    """`<parent>/<YYYYmmdd-HHMMSS>_<dataset>_<model>`, suffixed -2, -3 ... rather than reuse a folder."""
    stem = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}_{sanitize(dataset)}_{sanitize(model)}"
    candidate, n = parent / stem, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{stem}-{n}"
    return candidate


def aggregate(per_category: dict[str, dict], keys: Iterable[str] = HEADLINE_METRICS) -> tuple[dict, dict]:
    """Mean and population std of each metric over the categories that finished with a value for it."""
    means, stds = {}, {}
    for key in keys:
        values = [
            r["metrics"][key]
            for r in per_category.values()
            if r.get("status") == "ok" and r["metrics"].get(key) is not None
        ]
        if values:
            mean = sum(values) / len(values)
            means[key] = mean
            stds[key] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        else:
            means[key] = stds[key] = None
    return means, stds


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def environment(device: str | None = None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "timm", "numpy", "jsonargparse"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "device": device,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
    }


class RunFolder:
    """The files of one run; only the process that owns the run (global rank 0) writes."""

    def __init__(self, path: Path, writable: bool = True) -> None:
        self.path = path
        self.writable = writable

    @classmethod
    def create(cls, output_dir: str | None, parent: str, dataset: str, model: str, writable: bool) -> RunFolder:
        if output_dir is None:
            return cls(default_run_dir(Path(parent), dataset, model), writable)
        path = Path(output_dir).expanduser()
        if writable and path.exists() and any(path.iterdir()):
            raise RunError(f"--run.output_dir {path} exists and is not empty; choose a new folder or use --run.resume")
        return cls(path, writable)

    @classmethod
    def resume(cls, path: str, dataset: str, model: str, writable: bool) -> RunFolder:
        folder = cls(Path(path).expanduser(), writable)
        report = folder.read_report()
        if report is None:
            raise RunError(f"--run.resume {folder.path}: no report.json there, so it is not a lit-anomaly run folder")
        if (report.get("dataset"), report.get("model")) != (dataset, model):
            raise RunError(
                f"--run.resume {folder.path} holds a {report.get('dataset')}/{report.get('model')} run, "
                f"not {dataset}/{model}"
            )
        return folder

    def category_dir(self, category: str) -> Path:
        return self.path / "categories" / sanitize(category)

    def read_report(self, category: str | None = None) -> dict | None:
        path = (self.category_dir(category) if category else self.path) / "report.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def finished(self, categories: Sequence[str]) -> dict[str, dict]:
        """Category reports already on disk with status ok (what --run.resume skips)."""
        reports = {c: self.read_report(c) for c in categories}
        return {c: r for c, r in reports.items() if r is not None and r.get("status") == "ok"}

    def write_category(self, result: dict, records: list[dict] | None) -> None:
        if not self.writable:
            return
        directory = self.category_dir(result["category"])
        if records is not None:  # records first: a category report on disk means the category is complete
            write_atomic(directory / "per_image.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        write_atomic(directory / "report.json", to_json(result))

    def write_report(self, report: dict, config_yaml: str | None, copy_to: str | None) -> None:
        if not self.writable:
            return
        write_atomic(self.path / "report.json", to_json(report))
        if config_yaml is not None:
            write_atomic(self.path / "config.yaml", config_yaml)
        if copy_to:
            write_atomic(Path(copy_to), to_json(report))


def build_report(
    dataset: str,
    model: str,
    categories: Sequence[str],
    per_category: dict[str, dict],
    run_dir: Path | None,
    config: dict,
    env: dict,
) -> dict[str, Any]:
    means, stds = aggregate(per_category)
    return {
        "schema_version": SCHEMA_VERSION,
        "lit_anomaly_version": __version__,
        "timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dataset": dataset,
        "model": model,
        "categories": list(categories),
        "per_category": per_category,
        "mean_metrics": means,
        "std_metrics": stds,
        "run_dir": str(run_dir) if run_dir else None,
        "config": config,
        "environment": env,
    }
