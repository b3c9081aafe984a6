"""The report.json schema: one category's report as the pipeline hands it, aggregated over categories."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..metrics.classification import IMAGE_KEYS, PIXEL_KEYS

SCHEMA_VERSION = 1
HEADLINE_METRICS = (*IMAGE_KEYS, *PIXEL_KEYS, "mad")


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


LOCK_NAME = ".lock"


def build_report(
    dataset: str,
    model: str,
    categories: Sequence[str],
    per_category: dict[str, dict],
    run_dir: Path | None,
    config: dict,
    env: dict,
    wall_s: float | None = None,
    unified: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """report.json; `unified` is a unified run's section (its categories, class-agnostic threshold, shared fit)."""
    means, stds = aggregate(per_category)
    report = {
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
        "wall_s": wall_s,
        "config": config,
        "environment": env,
    }
    if unified is not None:
        report["unified"] = unified
    return report
