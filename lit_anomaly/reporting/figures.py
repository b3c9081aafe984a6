"""Figures of run reports as self-contained data URIs: matplotlib (Agg) plots as SVG, hard cases as PNG.

One palette for everything: normal images are blue, anomalous ones red, the calibrated threshold is a
dashed black line and the calibration scores a grey band; runs take RUN_COLOURS in order.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NORMAL = "#1f77b4"
ANOMALOUS = "#d62728"
THRESHOLD = "#111111"
CALIBRATION = "#b0b0b0"
OUTLINE = "#00e5ff"
RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MAP_COLOURMAP = "inferno"
STYLE = {
    "svg.fonttype": "none",  # text stays text: smaller files, selectable labels
    "svg.hashsalt": "lit-anomaly",  # stable ids: the same run gives the same page
    "font.size": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


@dataclass
class Curve:
    """One line of a plot: x and y values, its legend label and colour."""

    x: np.ndarray
    y: np.ndarray
    label: str
    colour: str = RUN_COLOURS[0]


def _run_ends(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives counted down the scores, read at the last image of every tie."""
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], labels[order] == 1
    run_end = np.append(ordered[1:] != ordered[:-1], True)
    true_positives = np.cumsum(hits)[run_end]
    return true_positives, np.cumsum(~hits)[run_end]


def roc_points(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct score, from (0, 0)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    true_positives, false_positives = _run_ends(scores, labels)
    return (
        np.concatenate([[0.0], false_positives / max(1, (labels == 0).sum())]),
        np.concatenate([[0.0], true_positives / max(1, (labels == 1).sum())]),
    )


def pr_points(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct score, from recall 0 at precision 1."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    true_positives, false_positives = _run_ends(scores, labels)
    return (
        np.concatenate([[0.0], true_positives / max(1, (labels == 1).sum())]),
        np.concatenate([[1.0], true_positives / np.maximum(1, true_positives + false_positives)]),
    )


def _figure(width: float = 2.9, height: float = 2.4):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry is touched

    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=0.16, bottom=0.17, right=0.97, top=0.96)  # fixed margins: one draw, not a layout pass
    return figure, figure.subplots()


def _svg_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode()


def curve_plot(curves: Sequence[Curve], kind: str) -> str:
    """ROC ("roc"), precision-recall ("pr") or PRO ("pro") curves as an SVG data URI."""
    import matplotlib

    labels = {"roc": ("false positive rate", "true positive rate"), "pr": ("recall", "precision"),
              "pro": ("false positive rate (pixels)", "per-region overlap")}  # fmt: skip
    with matplotlib.rc_context(STYLE):
        figure, axes = _figure()
        for curve in curves:
            axes.step(curve.x, curve.y, where="post", color=curve.colour, label=curve.label, linewidth=1.4)
        if kind == "roc":
            axes.plot([0, 1], [0, 1], color=CALIBRATION, linewidth=0.8, linestyle=":")
        axes.set_xlabel(labels[kind][0])
        axes.set_ylabel(labels[kind][1])
        axes.set_ylim(-0.02, 1.02)
        if kind != "pro":
            axes.set_xlim(-0.02, 1.02)
        if any(curve.label for curve in curves):
            axes.legend(loc="lower right", fontsize=7, frameon=False)
        return _svg_uri(figure)


def score_histogram(
    normal: Sequence[float],
    anomalous: Sequence[float],
    threshold: float | None,
    calibration_range: tuple[float, float] | None,
) -> str:
    """Test scores of normal and anomalous images, the threshold and the calibration scores' range (SVG)."""
    import matplotlib

    values = np.concatenate([np.asarray(normal, float), np.asarray(anomalous, float)])
    marks = [v for v in (threshold, *(calibration_range or ())) if v is not None]
    low, high = min([*values, *marks], default=0.0), max([*values, *marks], default=1.0)
    bins = np.linspace(low, high if high > low else low + 1.0, 31)
    with matplotlib.rc_context(STYLE):
        figure, axes = _figure()
        if calibration_range is not None:
            axes.axvspan(*calibration_range, color=CALIBRATION, alpha=0.35, linewidth=0, label="calibration scores")
        for scores, colour, name in ((normal, NORMAL, "normal"), (anomalous, ANOMALOUS, "anomalous")):
            axes.hist(
                scores, bins=bins, color=colour, alpha=0.6, histtype="stepfilled", label=f"{name} ({len(scores)})"
            )
        if threshold is not None:
            axes.axvline(threshold, color=THRESHOLD, linestyle="--", linewidth=1.2, label="threshold")
        axes.set_xlabel("image score")
        axes.set_ylabel("test images")
        axes.legend(fontsize=6, frameon=False)
        return _svg_uri(figure)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it: the region's border, one pixel wide."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def overlay_png(
    image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None, value_range: tuple[float, float]
) -> bytes:
    """The image beside the image under its anomaly map (`value_range` sets the colours, shared by a category's
    cases), the ground-truth border drawn on both, as a palette PNG. `image` is (H, W, 3) uint8 at the map's
    size."""
    import matplotlib
    from PIL import Image

    low, high = value_range
    shade = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0, 1)
    heat = matplotlib.colormaps[MAP_COLOURMAP](shade)[..., :3] * 255
    blended = (0.45 * image + 0.55 * heat).astype(np.uint8)
    panels = [image.copy(), blended]
    if mask is not None and mask.any():
        border = _outline(mask.astype(bool))
        colour = np.array([int(OUTLINE[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
        for panel in panels:
            panel[border] = colour
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    picture = Image.fromarray(np.concatenate([panels[0], gap, panels[1]], axis=1))
    buffer = io.BytesIO()
    picture.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(buffer, format="PNG")
    return buffer.getvalue()
