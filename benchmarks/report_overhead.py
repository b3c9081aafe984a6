"""What report.html costs: a demo-sized run over 15 categories with `--run.html` false and true, side by side.

    python benchmarks/report_overhead.py                # 15 categories of 66 train, 24 + 24 test, 256 px
    python benchmarks/report_overhead.py --repeats 2

Each run is a fresh process (`lit-anomaly fit+test`, whole process); the runs alternate so that drift on
a shared machine hits both. Prints one JSON line per run, then the medians and the overhead. Whole runs
differ by several percent from one to the next on a shared machine, more than the page costs, so a last
run in this process also times the work only the page needs (hard-case overlays, rendering, writing
report.html after every category) against that run's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lit_anomaly.data import MVTecAD, write_synthetic


def run(root: Path, output: Path, html: bool, workers: int) -> float:
    command = [
        sys.executable, "-m", "lit_anomaly", "fit+test", "--config", "configs/demo.yaml", "--data", "MVTecAD",
        "--data.root", str(root), "--data.category", "all", "--data.num_workers", str(workers),
        "--run.output_dir", str(output), "--run.html", str(html).lower(),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lit-anomaly-bench"))
    args = parser.parse_args()
    categories = list(MVTecAD.CATEGORIES[: args.categories])
    root = Path(args.cache) / f"report_{len(categories)}x66+24+24_256px"
    if not (root / ".complete").exists():
        write_synthetic(root, "MVTecAD", categories, 66, 24, 24, image_size=256)
        (root / ".complete").touch()
    walls: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for html in (False, True):
                output = Path(scratch) / f"{repeat}_{html}"
                walls[html].append(run(root, output, html, args.workers))
                print(json.dumps({"html": html, "repeat": repeat, "wall_s": round(walls[html][-1], 2)}), flush=True)
        page_work = measure_page_work(root, Path(scratch) / "in_process", args.workers, len(categories))
    without, with_html = statistics.median(walls[False]), statistics.median(walls[True])
    print(json.dumps({
        "categories": len(categories), "median_wall_s_without_html": round(without, 2),
        "median_wall_s_with_html": round(with_html, 2), "whole_run_overhead": round(with_html / without - 1, 4),
        **page_work,
    }))  # fmt: skip


def measure_page_work(root: Path, output: Path, workers: int, categories: int) -> dict:
    """One run in this process with the page's own work timed: the hard-case overlays and every write of
    report.html (render and atomic write)."""
    import yaml

    import lit_anomaly.pipelines.category as category
    from lit_anomaly.pipelines import run_benchmark
    from lit_anomaly.reporting.run_folder import RunFolder

    spent = {"hard_cases": 0.0, "page": 0.0}
    hard_cases, write_report = category.hard_case_overlays, RunFolder.write_report

    def timed_hard_cases(*args, **kwargs):
        started = time.perf_counter()
        try:
            return hard_cases(*args, **kwargs)
        finally:
            spent["hard_cases"] += time.perf_counter() - started

    def timed_write_report(folder, report, config_yaml, copy_to, html=False):
        write_report(folder, report, config_yaml, copy_to, False)
        started = time.perf_counter()
        if html:
            write_report(folder, report, None, None, html)
        spent["page"] += time.perf_counter() - started

    category.hard_case_overlays, RunFolder.write_report = timed_hard_cases, timed_write_report
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    data_args = {**config["data"]["init_args"], "root": str(root), "num_workers": workers}
    data_args.pop("category")
    started = time.perf_counter()
    run_benchmark(
        config["model"], {"class_path": "MVTecAD", "init_args": data_args}, "all", config["trainer"],
        {"output_dir": str(output)},
    )  # fmt: skip
    wall = time.perf_counter() - started
    page = (output / "report.html").stat().st_size
    work = spent["hard_cases"] + spent["page"]
    return {
        "in_process_wall_s": round(wall, 2), "page_work_s": round(work, 2),
        "hard_cases_s": round(spent["hard_cases"], 2), "page_writes_s": round(spent["page"], 2),
        "page_work_share": round(work / (wall - work), 4), "page_mb": round(page / 2**20, 2),
        "page_mb_per_category": round(page / 2**20 / categories, 3),
    }  # fmt: skip


if __name__ == "__main__":
    main()
