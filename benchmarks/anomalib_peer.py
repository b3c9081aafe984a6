"""anomalib's PatchCore on the same images and settings as fit_test_speed.py; prints one JSON line.

Runs with the Python of a virtual environment that has anomalib installed (it pins an older
jsonargparse than lit-anomaly). Weights: the same file lit-anomaly uses for efficientnet_lite0,
mapped by position onto timm's tf_efficientnet_lite0, and the same input normalisation.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import timm
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Patchcore
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize


def load_weights(extractor: torch.nn.Module, timm_name: str, path: str) -> None:
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    reference = timm.create_model(timm_name, pretrained=False).state_dict()
    renamed = dict(zip(reference.keys(), shipped.values(), strict=True))
    needed = extractor.state_dict()
    missing = set(needed) - set(renamed)
    if missing:
        raise SystemExit(f"weights miss {len(missing)} tensors")
    extractor.load_state_dict({k: renamed[k] for k in needed})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--layers", nargs="+", required=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--weights")
    parser.add_argument("--mean-std", type=float, nargs=2)
    parser.add_argument("--random-init", action="store_true")
    args = parser.parse_args()

    mean, std = ((args.mean_std[0],) * 3, (args.mean_std[1],) * 3) if args.mean_std else (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )  # fmt: skip
    size = (args.image_size, args.image_size)
    pre_processor = PreProcessor(transform=Compose([Resize(size, antialias=True), Normalize(mean=mean, std=std)]))
    started = time.perf_counter()
    model = Patchcore(
        backbone=args.backbone, layers=args.layers, pre_trained=False,
        coreset_sampling_ratio=args.coreset_ratio, pre_processor=pre_processor, visualizer=False,
    )  # fmt: skip
    if args.weights:
        load_weights(model.model.feature_extractor.feature_extractor, args.backbone, args.weights)
    datamodule = MVTecAD(
        root=args.root, category=args.category, train_batch_size=32, eval_batch_size=32, num_workers=args.workers
    )
    engine = Engine(accelerator=args.accelerator, devices=1, logger=False, default_root_dir=tempfile.mkdtemp())
    engine.fit(model=model, datamodule=datamodule)
    fitted = time.perf_counter()
    results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    tested = time.perf_counter()
    print(json.dumps({
        "impl": f"anomalib {__import__('anomalib').__version__}",
        "model": "Patchcore",
        "backbone": args.backbone,
        "device": args.accelerator,
        "image_size": args.image_size,
        "wall_s": round(tested - started, 3),
        "fit_s": round(fitted - started, 3),
        "test_s": round(tested - fitted, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "image_auroc": float(results["image_AUROC"]),
        "pixel_auroc": float(results["pixel_AUROC"]) if "pixel_AUROC" in results else None,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
