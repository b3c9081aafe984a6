"""The parity check: the user's images scored by PyTorch (what `lit-anomaly predict` does) and by the exported
bundle (what `lit-anomaly-infer` does), compared score by score, map by map and decision by decision."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.image_io import read_image
from ..models import AnomalyModule
from ..runtime.decision import flagged
from ..runtime.image import ImageError
from ..runtime.inferencer import Inferencer
from ..runtime.outputs import images_below

# Largest relative score difference an export may show, beside identical decisions. fp32: graph and PyTorch
# differ only in rounding (at most 2.5e-5 measured, PatchCore's distances). fp16 from measurement: float16
# weights and memory banks moved scores by up to 1e-2 relative (benchmarks/export_parity.py, docs/PERFORMANCE.md).
SCORE_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
LATENCY_IMAGES = 8


@dataclass
class Difference:
    """The largest absolute and relative difference of one quantity over the images, and the worst file."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_file: str | None = None

    def update(self, absolute: float, relative: float, path: str) -> None:
        self.max_abs = max(self.max_abs, absolute)
        if relative >= self.max_rel:
            self.max_rel, self.worst_file = relative, path


@dataclass
class ParityReport:
    """The check's findings; `passed` when no decision differs and every score is within the tolerance."""

    images: int
    precision: str
    score_tolerance_rel: float
    threshold: float | None
    score: Difference = field(default_factory=Difference)
    anomaly_map: Difference = field(default_factory=Difference)
    decisions_differ: int = 0
    differing_files: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    latency_ms_per_image: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.images > 0 and self.decisions_differ == 0 and self.score.max_rel <= self.score_tolerance_rel

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def failure(self) -> str:
        if self.images == 0:
            return "the check found no readable image"
        if self.decisions_differ:
            return f"{self.decisions_differ} decisions differ from PyTorch's (e.g. {self.differing_files[0]})"
        return (
            f"a score differs from PyTorch's by {self.score.max_rel:.3g} relative, above the "
            f"{self.precision} tolerance {self.score_tolerance_rel:g} ({self.score.worst_file})"
        )


def _median_ms_per_image(run: Callable[[np.ndarray], Any], images: np.ndarray, batch: int, repeats: int) -> float:
    chosen = images[np.arange(batch) % len(images)]
    run(chosen)  # warm-up: first-call allocations and kernel choices
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(chosen)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times) / batch


def check_parity(detector: AnomalyModule, bundle: Path, images_dir: str | Path, precision: str) -> ParityReport:
    """Score every image below `images_dir` with `detector` and with the bundle; compare."""
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise ImageError(f"--check {folder} does not exist or is not a folder of images")
    paths = images_below(folder)
    if not paths:
        raise ImageError(f"--check {folder} holds no images")
    inferencer = Inferencer(bundle)
    size, threshold = inferencer.image_size, inferencer.threshold
    report = ParityReport(0, precision, SCORE_TOLERANCE[precision], threshold)
    loaded, names = [], []
    for path in paths:
        try:
            runtime_input, _ = inferencer.load(path, str(path))
            torch_input = read_image(path, size, inferencer.max_pixels).transpose(2, 0, 1)
        except (ImageError, ValueError, OSError):
            report.unreadable.append(str(path))
            continue
        loaded.append((runtime_input, torch_input))
        names.append(str(path))
    report.images = len(loaded)
    if not loaded:
        return report

    def torch_scores(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():  # predict's path: the loader's bytes / 255, the detector's `score`
            output = detector.score(torch.from_numpy(batch).float().div_(255.0))
        return output["score"].double().numpy(), output["anomaly_map"][:, 0].float().numpy()

    runtime_images = np.stack([r for r, _ in loaded])
    torch_images = np.stack([t for _, t in loaded])
    for start in range(0, len(loaded), LATENCY_IMAGES):
        stop = start + LATENCY_IMAGES
        expected_scores, expected_maps = torch_scores(torch_images[start:stop])
        scores, maps = inferencer.score(runtime_images[start:stop])
        for i, name in enumerate(names[start:stop]):
            expected, got = float(expected_scores[i]), float(scores[i])
            difference = abs(got - expected)
            report.score.update(difference, difference / max(abs(expected), 1e-12), name)
            map_difference = float(np.abs(maps[i].astype(np.float64) - expected_maps[i]).max())
            scale = max(float(np.abs(expected_maps[i]).max()), 1e-12)
            report.anomaly_map.update(map_difference, map_difference / scale, name)
            if threshold is not None and flagged(got, threshold) != flagged(expected, threshold):
                report.decisions_differ += 1
                report.differing_files.append(name)
    report.latency_ms_per_image = {
        engine: {f"batch_{b}": round(_median_ms_per_image(run, images, b, 5 if b == 1 else 3), 2) for b in (1, 8)}
        for engine, run, images in (
            ("pytorch", torch_scores, torch_images),
            (inferencer.bundle.format, inferencer.score, runtime_images),
        )
    }
    return report
