"""Does the threshold keep its promise on normals the code never saw? And what does calibration cost?

    python benchmarks/calibration.py                      # promise table: 10 categories, 100 train, 400 unseen normals
    python benchmarks/calibration.py --cost               # fit wall time with and without calibration, 256 px

The promise: at quantile q, about 1 - q of unseen good parts are flagged. Each of 10 synthetic
categories (a different texture each, the "seeds") has `--train` normals to fit and calibrate on and
`--unseen` normals that neither fitting nor calibration touches. For every way of scoring the
normals that set the threshold, the rank rule picks the threshold at each q and the share of unseen
normals at or above it is pooled over the categories:

- in-sample: train normals scored by the model that learnt them (what a naive "train quantile" does);
- hold-out: 10 % of train held out from fitting and scored by the final model (lit-anomaly 0.1);
- leave-one-out, k-fold:5: every train normal scored by a model that did not see it (now the default).

One JSON line per (detector, category), then the pooled table as JSON and as Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw")
QUANTILES = (0.9, 0.95, 0.99)


def trainer():
    import pytorch_lightning as pl

    from lit_anomaly.callbacks import ResultCollector

    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ResultCollector()],
    )  # fmt: skip


def detector(name: str, calibration: str, args: argparse.Namespace):
    from lit_anomaly.models import MODELS

    return MODELS[name](backbone="efficientnet_lite0", calibration=calibration, calibration_quantile=0.9)


def datamodule(root: Path, category: str, args: argparse.Namespace, fraction: float = 0.0):
    from lit_anomaly.data import MVTecAD

    return MVTecAD(
        root, category, image_size=args.image_size, num_workers=args.workers, calibration_fraction=fraction,
        train_batch_size=32, eval_batch_size=64,
    )  # fmt: skip


def scores_of(model, dm, split: str):
    import torch

    from lit_anomaly.data.dataset import to_float_batch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(to_float_batch(b)["image"])["score"].double() for b in dm.dataloader(split)])


def unseen_normal_scores(model, dm):
    from lit_anomaly.callbacks import result_collector

    lightning = trainer()
    lightning.test(model, datamodule=dm, verbose=False)
    result = result_collector(lightning).test_result
    return result.score[result.label == 0]


def one_category(name: str, root: Path, category: str, args: argparse.Namespace) -> dict:
    """Calibration scores of every estimator and the unseen normals' scores of the model each belongs to."""
    out = {}
    dm = datamodule(root, category, args)
    model = detector(name, "leave-one-out", args)
    trainer().fit(model, datamodule=dm)
    unseen = unseen_normal_scores(model, dm)
    out["leave-one-out"] = (model.calibration.scores, unseen)
    if args.leave_one_out_only:
        return out
    out["in-sample"] = (scores_of(model, dm, "train"), unseen)
    model = detector(name, "k-fold:5", args)
    trainer().fit(model, datamodule=dm)
    out["k-fold:5"] = (model.calibration.scores, unseen)
    dm = datamodule(root, category, args, fraction=0.1)
    model = detector(name, "none", args)
    trainer().fit(model, datamodule=dm)
    out["hold-out"] = (model.calibration.scores, unseen_normal_scores(model, dm))
    return out


def promise_table(args: argparse.Namespace) -> None:
    from lit_anomaly.data import write_synthetic
    from lit_anomaly.metrics import conformal_threshold

    root = Path(args.cache) / f"calibration_{args.categories}x{args.train}+{args.unseen}_{args.image_size}px"
    if not (root / ".complete").exists():
        write_synthetic(root, "MVTecAD", CATEGORIES[: args.categories], args.train, args.unseen, 2, args.image_size)
        (root / ".complete").touch()
    pooled: dict[tuple[str, str, float], list[int]] = {}
    for name in args.models:
        for category in CATEGORIES[: args.categories]:
            line = {"model": name, "category": category}
            for estimator, (calibration, unseen) in one_category(name, root, category, args).items():
                for q in QUANTILES:
                    threshold = conformal_threshold(calibration, q).threshold
                    flagged = int((unseen > threshold).sum())  # the decision rule: strictly above
                    counts = pooled.setdefault((name, estimator, q), [0, 0])
                    counts[0], counts[1] = counts[0] + flagged, counts[1] + len(unseen)
                    line[f"{estimator}@{q}"] = round(flagged / len(unseen), 4)
            print(json.dumps(line), flush=True)
    table = {f"{n}/{e}@{q}": round(f / t, 4) for (n, e, q), (f, t) in pooled.items()}
    print(json.dumps({"pooled_share_of_unseen_normals_flagged": table, "unseen_per_category": args.unseen}))
    estimators = list(dict.fromkeys(e for _, e, _ in pooled))
    print("\n| detector | scores used | " + " | ".join(f"q = {q}" for q in QUANTILES) + " |")
    print("|---|---|" + "---|" * len(QUANTILES))
    for name in args.models:
        for estimator in estimators:
            cells = [f"{pooled[(name, estimator, q)][0] / pooled[(name, estimator, q)][1]:.3f}" for q in QUANTILES]
            print(f"| {name} | {estimator} | " + " | ".join(cells) + " |")
    print("| promised | 1 - q | " + " | ".join(f"{1 - q:.3f}" for q in QUANTILES) + " |")
    failures = [
        f"{n}@{q}: {f / t:.4f}"
        for (n, e, q), (f, t) in pooled.items()
        if e == "leave-one-out" and not 0.5 * (1 - q) <= f / t <= 1 - q + 0.01
    ]
    print(json.dumps({"leave_one_out_within_bounds": not failures, "outside": failures}))


def cost(args: argparse.Namespace) -> None:
    """Median fit wall time (Lightning's fit, data loading included) with calibration off and on."""
    from lit_anomaly.data import write_synthetic

    root = Path(args.cache) / f"cost_{args.train}_{args.image_size}px"
    if not (root / ".complete").exists():
        write_synthetic(root, "MVTecAD", ["bottle"], args.train, 4, 4, args.image_size)
        (root / ".complete").touch()
    for name in args.models:
        times: dict[str, list[float]] = {"none": [], "leave-one-out": []}
        for _ in range(args.repeats):
            for calibration in times:  # alternate, so drift hits both alike
                dm = datamodule(root, "bottle", args)
                model = detector(name, calibration, args)
                started = time.perf_counter()
                trainer().fit(model, datamodule=dm)
                times[calibration].append(time.perf_counter() - started)
        base, calibrated = (statistics.median(times[k]) for k in ("none", "leave-one-out"))
        print(json.dumps({
            "model": name, "train_images": args.train, "image_size": args.image_size,
            "fit_s_without_calibration": round(base, 2), "fit_s_with_leave_one_out": round(calibrated, 2),
            "added": round(calibrated / base - 1, 3), "runs": times,
        }), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost", action="store_true", help="measure calibration's share of fit time instead")
    parser.add_argument("--models", nargs="+", default=["PatchCore", "PaDiM"])
    parser.add_argument("--categories", type=int, default=10, help="seeds: one texture each, at most 10")
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--unseen", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=None, help="default 128 (table), 256 (--cost)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--leave-one-out-only", action="store_true", help="skip the other estimators (faster)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lit-anomaly-bench"))
    args = parser.parse_args()
    args.image_size = args.image_size or (256 if args.cost else 128)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    (cost if args.cost else promise_table)(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
