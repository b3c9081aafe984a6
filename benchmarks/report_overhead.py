"""What report.html costs: a demo-sized run over 15 categories with `--run.html` false and true, side by side.

    python benchmarks/report_overhead.py                # 15 categories of 66 train, 24 + 24 test, 256 px
    python benchmarks/report_overhead.py --repeats 2

Each run is a fresh process (`lit-anomaly fit+test`, whole process); the runs alternate so that drift on
a shared machine hits both. Prints one JSON line per run, then the medians and the overhead. The last
line also times rendering the finished page from scratch (every section uncached) and reports its size.
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
        from lit_anomaly.reporting.html import RunPage

        folder = Path(scratch) / f"0_{True}"
        report = json.loads((folder / "report.json").read_text())
        started = time.perf_counter()
        page = RunPage(folder).render(report)
        render_s = time.perf_counter() - started
    without, with_html = statistics.median(walls[False]), statistics.median(walls[True])
    print(json.dumps({
        "categories": len(categories), "median_wall_s_without_html": round(without, 2),
        "median_wall_s_with_html": round(with_html, 2), "overhead": round(with_html / without - 1, 4),
        "render_whole_page_s": round(render_s, 2), "page_mb": round(len(page.encode()) / 2**20, 2),
        "page_mb_per_category": round(len(page.encode()) / 2**20 / len(categories), 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
