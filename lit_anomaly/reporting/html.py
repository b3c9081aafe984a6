"""report.html: one self-contained page per run (inline CSS, figures as data URIs, no script, no network).

Reads only what the run folder holds: report.json, each category's report.json, per_image.jsonl and
hard_cases/*.png. A category's section is rendered once and reused while its report is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from ..runtime.decision import flagged
from ..runtime.files import sanitize
from .figures import ANOMALOUS, NORMAL, Curve, curve_plot, png_uri, pr_points, roc_points, score_histogram
from .report import HEADLINE_METRICS

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:16px 24px;color:#1b1b1b}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;
padding-bottom:4px}h3{font-size:15px;margin:16px 0 6px}
.meta{color:#555;margin:0 0 10px}
table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #e0e0e0;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
td small{color:#777}.kv td{text-align:left}
.failed{color:#b00020}.error{background:#fdecea;border-left:4px solid #b00020;padding:8px 12px;
white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px}
.figures{display:flex;flex-wrap:wrap;gap:10px}.figures figure{margin:0}
figcaption{font-size:12px;color:#555;max-width:275px}td small{white-space:nowrap}
.cases{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.cases img{width:100%;image-rendering:pixelated;border:1px solid #ddd}
.better{background:#e6f4ea}.worse{background:#fdecea}
nav a{margin-right:10px}.legend{font-size:12px;color:#555}.scroll{overflow-x:auto}
"""
CASE_KINDS = {"false_alarm": "Highest-scored normal images", "missed_defect": "Lowest-scored anomalous images"}


def number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"
    return escape(str(value))


def metric_cell(value: float | None, interval: Sequence[float] | None, attributes: str = "", extra: str = "") -> str:
    """A metric's cell: the value, its interval below it, then `extra` (HTML)."""
    shown = number(value)
    if interval is not None and value is not None:
        shown += f"<br><small>[{interval[0]:.3f}, {interval[1]:.3f}]</small>"
    return f"<td{attributes}>{shown}{extra}</td>"


def table(header: Iterable[str], rows: Iterable[Iterable[str]], css: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(uri: str, caption: str, alt: str, style: str = "") -> str:
    style = f' style="{style}"' if style else ""
    return f'<figure{style}><img src="{uri}" alt="{escape(alt)}"><figcaption>{escape(caption)}</figcaption></figure>'


def page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f"<body>{body}</body></html>\n"
    )


def read_records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def labelled(records: Sequence[Mapping]) -> tuple[list[float], list[int]]:
    known = [r for r in records if r.get("label") in (0, 1) and r.get("score") is not None]
    return [float(r["score"]) for r in known], [int(r["label"]) for r in known]


def key_settings(report: Mapping) -> list[tuple[str, Any]]:
    config = report.get("config") or {}
    settings = [(f"model.{k}", v) for k, v in ((config.get("model") or {}).get("init_args") or {}).items()]
    settings += [(f"data.{k}", v) for k, v in ((config.get("data") or {}).get("init_args") or {}).items()]
    trainer = config.get("trainer") or {}
    settings += [
        (f"trainer.{k}", trainer[k]) for k in ("accelerator", "devices", "strategy", "precision") if k in trainer
    ]
    return [(k, v) for k, v in settings if v is not None]


def _promise(provenance: Mapping | None) -> str:
    """A threshold's promise in one line: q, how its normals were scored, how many, the false-alarm share."""
    bound = (provenance or {}).get("false_alarm_bound")
    if bound is None:
        return "none"
    return (f"q {provenance.get('quantile')} · {provenance.get('method')} · n {provenance.get('n')} · "
            f"≤ {100 * bound:.3g} % false alarms")  # fmt: skip


def _unified(unified: Mapping | None) -> str:
    """A unified run's line: one detector for every category, its shared fit and class-agnostic threshold."""
    if not unified:
        return ""
    timing = unified.get("timing") or {}
    fit = sum(v for v in (timing.get("fit_s"), timing.get("calibrate_s")) if v is not None) if timing else None
    threshold, promise = unified.get("threshold"), escape(_promise(unified.get("threshold_provenance")))
    return (
        f"<p class='meta'>Unified: one detector fitted on the train normals of all {len(unified['categories'])} "
        f"categories together (fit and calibration {number(fit, 1)} s); each category is decided at its own "
        f"threshold. Class-agnostic threshold {number(threshold)} ({promise}), for images of any of them.</p>"
    )


class RunPage:
    """Builds report.html for one run folder; keeps each category's rendered section while its report is unchanged."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._sections: dict[str, tuple[str, str]] = {}

    def render(self, report: Mapping) -> str:
        per_category = report.get("per_category") or {}
        header = self._header(report)
        summary = self._summary(report, per_category)
        sections = "".join(self._section(name, result) for name, result in per_category.items())
        pending = [c for c in report.get("categories", []) if c not in per_category]
        if pending:
            sections += f"<p class='meta'>Not finished yet: {escape(', '.join(pending))}.</p>"
        title = f"{report.get('model')} on {report.get('dataset')} · lit-anomaly"
        return page(title, header + summary + sections)

    def _header(self, report: Mapping) -> str:
        environment = report.get("environment") or {}
        devices = sorted({str((r.get("hardware") or {}).get("device")) for r in report["per_category"].values()
                          if r.get("hardware")} or {str(environment.get("device"))})  # fmt: skip
        meta = [
            f"lit-anomaly {report.get('lit_anomaly_version')}",
            f"device {', '.join(devices)}",
            f"{report.get('timestamp_utc')}",
            f"wall time {number(report.get('wall_s'), 1)} s",
        ]
        settings = table(["setting", "value"], ([f"<td>{escape(k)}</td>", f"<td>{escape(str(v))}</td>"]
                                                for k, v in key_settings(report)), "kv")  # fmt: skip
        nav = "".join(f'<a href="#category-{escape(c)}">{escape(c)}</a>' for c in report.get("per_category", {}))
        return (
            f"<header><h1>{escape(str(report.get('model')))} on {escape(str(report.get('dataset')))}</h1>"
            f"<p class='meta'>{escape(' · '.join(meta))}</p><details><summary>Settings</summary>{settings}</details>"
            f"<nav>{nav}</nav></header>"
        )

    def _summary(self, report: Mapping, per_category: Mapping[str, Mapping]) -> str:
        means, stds = report.get("mean_metrics") or {}, report.get("std_metrics") or {}
        shown = [k for k in HEADLINE_METRICS if any((r.get("metrics") or {}).get(k) is not None
                                                    for r in per_category.values())]  # fmt: skip
        finished = sum(r.get("status") == "ok" for r in per_category.values())
        if finished == 1:  # the std of one value says nothing, and "± 0.000" would read as a finding
            header, values = "value (one category)", {k: number(means.get(k)) for k in shown}
        else:
            header = f"mean ± std over {finished} categories"
            values = {k: f"{number(means.get(k))} ± {number(stds.get(k))}" for k in shown}
        overall = table(["metric", header], ([f"<td>{k}</td>", f"<td>{v}</td>"] for k, v in values.items()))
        rows = []
        for name, result in per_category.items():
            link = f'<td><a href="#category-{escape(name)}">{escape(name)}</a></td>'
            if result.get("status") != "ok":
                error = escape(str(result.get("error")))
                rows.append([link, f'<td class="failed" colspan="{len(shown) + 1}">failed: {error}</td>'])
                continue
            intervals = result.get("metric_intervals") or {}
            cells = [metric_cell(result["metrics"].get(k), intervals.get(k)) for k in shown]
            promise = escape(_promise(result.get("threshold_provenance")))
            rows.append([link, *cells, f"<td style='text-align:left'>{promise}</td>"])
        by_category = table(["category", *shown, "threshold's promise"], rows)
        unified = _unified(report.get("unified"))
        return (
            f"<section id='summary'><h2>Summary</h2>{unified}{overall}<h3>Categories</h3>"
            f"<div class='scroll'>{by_category}</div>"
            "<p class='legend'>Brackets: 95 % bootstrap interval (normal and anomalous test images resampled "
            "separately). Promise: quantile q, how the calibration normals were scored, how many, and the "
            "share of good parts the threshold flags at most, on average.</p></section>"
        )

    def _section(self, name: str, result: Mapping) -> str:
        directory = self.folder / "categories" / sanitize(name)  # as RunFolder.category_dir names it
        stamp = json.dumps(result, sort_keys=True, default=str)
        cached = self._sections.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        html = category_section(name, result, directory)
        self._sections[name] = (stamp, html)
        return html


def category_figures(name: str, result: Mapping, records: Sequence[Mapping]) -> list[str]:
    """ROC, precision-recall, score histogram and (with masks) PRO curve of one category, as <figure>s."""
    scores, labels = labelled(records)
    figures = []
    if 0 in labels and 1 in labels:
        auroc, ap = result["metrics"].get("image_auroc"), result["metrics"].get("image_ap")
        figures.append(figure(curve_plot([Curve(*roc_points(scores, labels), f"AUROC {number(auroc)}")], "roc"),
                              "Image ROC: anomalous images found against normal images flagged, over all thresholds.",
                              f"{name} ROC curve"))  # fmt: skip
        figures.append(figure(curve_plot([Curve(*pr_points(scores, labels), f"AP {number(ap)}")], "pr"),
                              "Precision-recall: the share of flagged images that are anomalous, against the "
                              "share found.",
                              f"{name} precision-recall curve"))  # fmt: skip
    if scores:
        provenance = result.get("threshold_provenance") or {}
        span = provenance.get("score_range")
        histogram = score_histogram([s for s, y in zip(scores, labels, strict=True) if y == 0],
                                    [s for s, y in zip(scores, labels, strict=True) if y == 1],
                                    result.get("threshold"), tuple(span) if span else None)  # fmt: skip
        figures.append(figure(histogram, "Test scores of normal (blue) and anomalous (red) images; dashed: the "
                                         "calibrated threshold; grey: the range of the calibration scores.",
                              f"{name} score histogram"))  # fmt: skip
    pro = (result.get("curves") or {}).get("pro")
    if pro:
        label = f"AUPRO {number(result['metrics'].get('pixel_aupro'))}"
        figures.append(figure(curve_plot([Curve(pro["fpr"], pro["pro"], label)], "pro"),
                              f"PRO curve up to the AUPRO limit (FPR {pro['fpr_limit']}): mean overlap with each "
                              "ground-truth region against the share of normal pixels flagged.",
                              f"{name} PRO curve"))  # fmt: skip
    return figures


def category_section(name: str, result: Mapping, directory: Path) -> str:
    anchor = f"<section id='category-{escape(name)}'><h2>{escape(name)}</h2>"
    if result.get("status") != "ok":
        return f"{anchor}<div class='error'>{escape(str(result.get('error')))}</div></section>"
    records = read_records(directory / "per_image.jsonl")
    figures = category_figures(name, result, records)
    if not records:
        figures.append("<p class='meta'>No per_image.jsonl in this run (--run.per_image_jsonl false): no curves.</p>")
    parts = [anchor, f"<div class='figures'>{''.join(figures)}</div>"]
    by_type = result.get("metrics_by_defect_type") or {}
    if by_type:
        keys = [
            k
            for k in ("image_auroc", "image_ap", "image_recall")
            if any(m.get(k) is not None for m in by_type.values())
        ]
        rows = ([f"<td>{escape(t)}</td>", *(f"<td>{number(m.get(k))}</td>" for k in keys)] for t, m in by_type.items())
        parts.append(f"<h3>By defect type (each against all normal images)</h3>{table(['defect type', *keys], rows)}")
    parts.append(hard_cases(result.get("hard_cases") or [], directory, result.get("threshold")))
    parts.append("</section>")
    return "".join(parts)


def hard_cases(cases: Sequence[Mapping], directory: Path, threshold: float | None) -> str:
    if not cases:
        return ""
    html = ["<h3>Hardest cases</h3><p class='legend'>Left: the image; right: its anomaly map (dark: low, bright: "
            "high, one scale per category); cyan: the ground-truth outline.</p>"]  # fmt: skip
    for kind, title in CASE_KINDS.items():
        shown = []
        for case in (c for c in cases if c.get("kind") == kind):
            try:
                uri = png_uri((directory / case["file"]).read_bytes())
            except OSError:
                continue
            verdict = "flagged" if threshold is not None and flagged(case["score"], threshold) else "passed"
            colour = NORMAL if kind == "false_alarm" else ANOMALOUS
            caption = f"{Path(case['path']).name} ({case.get('defect_type')}): score {case['score']:.4g}, {verdict}"
            shown.append(figure(uri, caption, f"{kind} {case['path']}", f"border-top:3px solid {colour}"))
        if shown:
            html.append(f"<h3>{escape(title)}</h3><div class='cases'>{''.join(shown)}</div>")
    return "".join(html)
