"""How far an export's scores move from PyTorch's, per detector, format and precision, on generated data.

Fits every detector on a synthetic category (efficientnet_lite0), exports it to ONNX and OpenVINO at fp32 and
fp16 with the parity check on the category's test images, and prints one JSON line per export: the largest
relative score and map difference and how many decisions differ. The fp16 tolerance of `lit-anomaly export
--check` is set from these figures (docs/PERFORMANCE.md).

    python benchmarks/export_parity.py [--image-size 128] [--train 24] [--test 12]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train", type=int, default=24)
    parser.add_argument("--test", type=int, default=12)
    parser.add_argument("--models", nargs="+", default=["PatchCore", "PaDiM", "STFPM", "ReverseDistillation"])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    import lit_anomaly.export.check as check
    from lit_anomaly.cli import main as cli
    from lit_anomaly.data import write_synthetic
    from lit_anomaly.export import export_bundle

    check.SCORE_TOLERANCE.update(fp32=1e9, fp16=1e9)  # measure, do not judge
    work = Path(tempfile.mkdtemp())
    root = write_synthetic(work / "data", "MVTecAD", ["tile"], args.train, args.test, args.test // 2, args.image_size)
    for name in args.models:
        fit = work / "fit" / name
        code = cli([
            "fit", "--model", name, "--model.backbone", "efficientnet_lite0", "--data", "MVTecAD",
            "--data.root", str(root), "--data.category", "tile", "--data.image_size", str(args.image_size),
            "--data.num_workers", "0", "--trainer.default_root_dir", str(fit), "--trainer.max_epochs", str(args.epochs),
        ])  # fmt: skip
        assert code == 0, name
        checkpoint = next(fit.rglob("detector.ckpt"))
        for format_name in ("onnx", "openvino"):
            for precision in ("fp32", "fp16"):
                output = work / "bundles" / f"{name}_{format_name}_{precision}"
                parity = export_bundle(checkpoint, format_name, output, precision, root / "tile" / "test").parity
                print(json.dumps({
                    "model": name, "format": format_name, "precision": precision, "images": parity.images,
                    "score_max_rel": parity.score.max_rel, "map_max_rel": parity.anomaly_map.max_rel,
                    "decisions_differ": parity.decisions_differ, "latency_ms_per_image": parity.latency_ms_per_image,
                }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
