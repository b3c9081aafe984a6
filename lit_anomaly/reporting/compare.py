"""`lit-anomaly compare RUN_DIR RUN_DIR ...`: several finished runs side by side, with the noise taken into
account (bootstrap intervals, DeLong's paired test per category, mean ranks and Friedman's test overall)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path
from typing import Any

from ..runtime.files import RunError, check_output_file, sanitize, to_json, write_atomic
from .figures import RUN_COLOURS, Curve, curve_plot, roc_points
from .html import figure, labelled, metric_cell, number, page, read_records, table
from .report import HEADLINE_METRICS, aggregate
from .statistics import delong_test, rank_summary


@dataclass
class Run:
    """One run folder: its report and, per category, its per-image records."""

    path: Path
    name: str
    report: dict[str, Any]
    records: dict[str, list[dict]]

    @classmethod
    def load(cls, path: str | Path) -> Run:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise RunError(f"{folder}: no such run folder")
        try:
            report = json.loads((folder / "report.json").read_text())
        except (OSError, ValueError) as error:
            raise RunError(f"{folder}: no readable report.json, so not a lit-anomaly run folder") from error
        records = {
            category: read_records(folder / "categories" / sanitize(category) / "per_image.jsonl")
            for category in report.get("per_category", {})
        }
        return cls(folder, folder.resolve().name, report, records)

    @property
    def label(self) -> str:
        backbone = ((self.report.get("config") or {}).get("model") or {}).get("init_args", {}).get("backbone")
        unified = ", unified" if self.report.get("unified") else ""  # one detector for all categories
        return f"{self.name} ({self.report.get('model')}{f', {backbone}' if backbone else ''}{unified})"

    def result(self, category: str) -> dict[str, Any]:
        return self.report["per_category"].get(category) or {}

    def finished(self, category: str) -> bool:
        return self.result(category).get("status") == "ok"

    def metric(self, category: str, key: str) -> float | None:
        return (self.result(category).get("metrics") or {}).get(key) if self.finished(category) else None


def image_key(record: dict) -> str:
    """An image's identity across runs of one dataset, even from another copy of it: split/type/file."""
    return "/".join(Path(record["path"]).parts[-3:])


def shared_categories(runs: Sequence[Run]) -> list[str]:
    """Categories every run has, after refusing runs of different datasets or of disjoint test images."""
    datasets = {run.report.get("dataset") for run in runs}
    if len(datasets) > 1:
        shown = ", ".join(f"{run.path} is {run.report.get('dataset')}" for run in runs)
        raise RunError(f"compare needs runs on the same dataset: {shown}")
    categories = [
        c for c in runs[0].report.get("categories", []) if all(c in r.report.get("categories", []) for r in runs)
    ]
    if not categories:
        raise RunError("compare needs runs that share at least one category; these have none in common")
    for category in categories:
        keys = [{image_key(r) for r in run.records.get(category, [])} for run in runs]
        known = [k for k in keys if k]
        if len(known) > 1 and not set.intersection(*known):
            raise RunError(
                f"category {category}: the runs tested different images (no file in common), so they are not "
                f"runs on the same data: {', '.join(str(run.path) for run in runs)}"
            )
    return categories


def paired_tests(runs: Sequence[Run], category: str) -> list[dict[str, Any] | None]:
    """DeLong's test of each run's image AUROC against the first run's, on the images both scored."""

    def by_key(run: Run) -> dict[str, dict]:
        return {image_key(r): r for r in run.records.get(category, []) if r.get("label") in (0, 1)}

    first, tests = by_key(runs[0]), [None]
    for run in runs[1:]:
        if not (runs[0].finished(category) and run.finished(category)):
            tests.append(None)  # a failed category's scores, if any are on disk, are not its results
            continue
        other = by_key(run)
        keys = sorted(set(first) & set(other))
        labels = [first[k]["label"] for k in keys]
        if 0 not in labels or 1 not in labels:
            tests.append(None)
            continue
        test = delong_test([other[k]["score"] for k in keys], [first[k]["score"] for k in keys], labels)
        tests.append({**asdict(test), "significant": test.significant, "images": len(keys)})
    return tests


def comparison(runs: Sequence[Run]) -> dict[str, Any]:
    """The comparison as one JSON-ready document (what stdout carries and the page shows)."""
    categories = shared_categories(runs)
    keys = [k for k in HEADLINE_METRICS if any(run.metric(c, k) is not None for run in runs for c in categories)]
    metrics = {k: {c: [run.metric(c, k) for run in runs] for c in categories} for k in keys}
    intervals = {
        k: {c: [(run.result(c).get("metric_intervals") or {}).get(k) for run in runs] for c in categories} for k in keys
    }
    # the means pair the runs: over the categories every run finished, not each run's own successes
    finished = [c for c in categories if all(run.finished(c) for run in runs)]
    summaries = [aggregate({c: run.result(c) for c in finished}, keys) for run in runs]
    ranks = rank_summary([{c: run.metric(c, "image_auroc") for c in categories} for run in runs], "image_auroc")
    return {
        "runs": [
            {
                "path": str(run.path),
                "name": run.name,
                "label": run.label,
                "model": run.report.get("model"),
                "dataset": run.report.get("dataset"),
                "timestamp_utc": run.report.get("timestamp_utc"),
            }
            for run in runs
        ],
        "categories": categories,
        "finished_categories": finished,
        "metrics": metrics,
        "intervals": intervals,
        "mean": {k: [means[k] for means, _ in summaries] for k in keys},
        "std": {k: [stds[k] for _, stds in summaries] for k in keys},
        "paired_image_auroc": {c: paired_tests(runs, c) for c in categories},
        "ranks": asdict(ranks),
    }


def _difference(value: float | None, reference: float | None) -> tuple[str, str]:
    """The cell's class and its difference to the first run's value."""
    if value is None or reference is None:
        return "", ""
    delta = value - reference
    css = "better" if delta >= 5e-4 else "worse" if delta <= -5e-4 else ""  # what three decimals show
    return css, f" <small>Δ {delta:+.3f}</small>" if css else ""


def summary_heading(categories: Sequence[str], finished: Sequence[str]) -> str:
    """What the summary's means cover: the shared categories that every run finished."""
    left_out = [c for c in categories if c not in finished]
    if len(finished) == 1:
        which = "category every run finished" if left_out else "shared category"
        heading = f"<h2>On the one {which}, {escape(finished[0])}</h2>"
    else:
        which = "categories every run finished" if left_out else "shared categories"
        heading = f"<h2>Mean ± std over the {len(finished)} {which}</h2>"
    if left_out:
        heading += f"<p>Not in the means (failed in at least one run): {escape(', '.join(left_out))}.</p>"
    return heading


def compare_page(runs: Sequence[Run], document: dict[str, Any]) -> str:
    categories, keys = document["categories"], list(document["metrics"])
    names = [f"#{i + 1}" for i in range(len(runs))]
    listing = table(
        ["run", "folder", "detector", "date", "wall time (s)"],
        ([f"<td style='color:{RUN_COLOURS[i % len(RUN_COLOURS)]}'>{names[i]}</td>", f"<td>{escape(str(run.path))}</td>",
          f"<td>{escape(run.label)}</td>", f"<td>{escape(str(run.report.get('timestamp_utc')))}</td>",
          f"<td>{number(run.report.get('wall_s'), 1)}</td>"] for i, run in enumerate(runs)),
        "kv",
    )  # fmt: skip
    finished = document["finished_categories"]
    spread = len(finished) != 1  # as in report.html: the std of one value says nothing
    summary_rows = []
    for key in keys:
        cells = [f"<td>{key}</td>"]
        for i, (mean, std) in enumerate(zip(document["mean"][key], document["std"][key], strict=True)):
            css, delta = _difference(mean, document["mean"][key][0]) if i else ("", "")
            shown = f"{number(mean)} ± {number(std)}" if spread else number(mean)
            cells.append(f"<td class='{css}'>{shown}{delta}</td>")
        summary_rows.append(cells)
    ranks = document["ranks"]
    rank_text = ", ".join(f"{names[i]} {number(r, 2)}" for i, r in enumerate(ranks["mean_rank"]))
    friedman = (f"Friedman's test over {len(ranks['categories'])} categories: χ² = {ranks['friedman_statistic']:.3g}, "
                f"p = {ranks['friedman_p']:.3g}." if ranks["friedman_p"] is not None else
                "Friedman's test needs at least three runs and two categories.")  # fmt: skip
    body = [
        f"<h1>{len(runs)} runs on {escape(str(runs[0].report.get('dataset')))}</h1>{listing}",
        summary_heading(categories, finished),
        table(["metric", *names], summary_rows),
        f"<p>Mean rank by image AUROC (1 = best): {escape(rank_text)}. {escape(friedman)}</p>",
    ]
    for key in keys:
        rows = []
        for category in categories:
            values, intervals = document["metrics"][key][category], document["intervals"][key][category]
            cells = [f"<td>{escape(category)}</td>"]
            for i, (value, interval) in enumerate(zip(values, intervals, strict=True)):
                css, delta = _difference(value, values[0]) if i else ("", "")
                test = document["paired_image_auroc"][category][i] if key == "image_auroc" else None
                if test is not None:
                    delta += f" <small>p {test['p_value']:.2g}{' *' if test['significant'] else ''}</small>"
                cells.append(metric_cell(value, interval, f" class='{css}'", delta))
            rows.append(cells)
        body.append(f"<h2>{key}</h2>{table(['category', *names], rows)}")
    body.append(
        "<p class='legend'>Brackets: 95 % bootstrap interval. Δ: difference to run #1 (green higher, red lower). "
        "p: DeLong's paired test of image AUROC against run #1 on the same images; * marks p &lt; 0.05.</p>"
    )
    figures = []
    for category in categories:
        curves = []
        for i, run in enumerate(runs):
            scores, labels = labelled(run.records.get(category, []))
            if 0 in labels and 1 in labels:
                curves.append(Curve(*roc_points(scores, labels), names[i], RUN_COLOURS[i % len(RUN_COLOURS)]))
        if curves:
            figures.append(figure(curve_plot(curves, "roc"), f"{category}: image ROC of every run", f"{category} ROC"))
    body.append(f"<h2>Image ROC per category</h2><div class='figures'>{''.join(figures)}</div>")
    return page(f"lit-anomaly compare: {len(runs)} runs", "".join(body))


def main(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lit-anomaly compare",
        description="Compare finished runs of one dataset: one self-contained HTML page, and the same tables as "
        "one JSON document on stdout.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders; the first is the reference")
    parser.add_argument("--output", default="compare.html", help="the HTML page to write (default: compare.html)")
    options = parser.parse_args(list(args))
    if len(options.runs) < 2:
        raise RunError("compare needs at least two run folders")
    output = check_output_file(options.output, "--output", "the HTML page")
    runs = [Run.load(path) for path in options.runs]
    document = comparison(runs)
    try:
        write_atomic(output, compare_page(runs, document))
    except OSError as error:  # a full disk, or a folder that refuses files although access() allowed them
        raise RunError(f"--output {output}: cannot write the page: {error.strerror or error}") from error
    print(to_json({**document, "output": str(output)}), end="")
    return 0
