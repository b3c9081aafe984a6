"""The hardest test cases of a category, chosen once for report.html and TensorBoard, on one colour scale."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from ..metrics.evaluation import TestResult
from .figures import overlay_png

CASE_FIELDS = ("index", "path", "defect_type", "label", "score")


def select_hard_cases(records: Sequence[Mapping], count: int) -> list[dict[str, Any]]:
    """The `count` highest-scored normal images (false alarms first) and `count` lowest-scored anomalous ones."""
    normal = sorted((r for r in records if r.get("label") == 0), key=lambda r: -r["score"])[:count]
    anomalous = sorted((r for r in records if r.get("label") == 1), key=lambda r: r["score"])[:count]
    return [{**{k: r.get(k) for k in CASE_FIELDS}, "kind": kind}
            for kind, chosen in (("false_alarm", normal), ("missed_defect", anomalous)) for r in chosen]  # fmt: skip


def colour_range(maps: Tensor, labels: Tensor) -> tuple[float, float]:
    """A category's colour scale for anomaly maps: from the normal images' median pixel score (all images'
    where there are no normal ones) to the highest pixel score, so that a good part's map looks calm."""
    normal_maps = maps[labels == 0]
    low = float((normal_maps if len(normal_maps) else maps)[:, ::4, ::4].median())
    return low, float(maps.max())


def result_records(result: TestResult) -> list[dict[str, Any]]:
    """The fields `select_hard_cases` reads, for every test image of `result`."""
    return [
        {"index": index, "label": label, "score": score}
        for index, label, score in zip(result.index.tolist(), result.label.tolist(), result.score.tolist(), strict=True)
    ]


def hard_case_overlays(
    result: TestResult, records: list[dict[str, Any]], count: int
) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The hardest test images (`select_hard_cases`) and, for each, a PNG of the image beside its anomaly map with
    the ground truth outlined, keyed by its file name in the category folder."""
    cases = select_hard_cases(records, count) if count > 0 else []
    if not cases:
        return [], {}
    position = {int(i): p for p, i in enumerate(result.index.tolist())}
    value_range = colour_range(result.maps, result.label)
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
