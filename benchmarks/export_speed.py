"""Exported detectors against PyTorch, side by side in one run: model latency per image at batch 1 and 8, and
whole processes from launch to the first result and over a folder.

PatchCore with efficientnet_lite0 (layers 2 and 3, coreset 0.1) is fitted at 256 px on two generated sets:
a 256-px category, and the high-resolution preset's 2448 x 2048 PNGs (fitted at 256 px, as
`fit_test_speed.py --preset highres` runs it). Each fitted detector is exported to ONNX and OpenVINO with
`--check` on the set's test images, whose report gives the latencies (model only: decoded, resized images in
memory; the median of repeated calls, after a warm-up). Then `lit-anomaly predict` and `lit-anomaly-infer` run
as whole processes on one image (launch to exit, the first result written) and on every test image.

    python benchmarks/export_speed.py [--cache DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = {  # name: (train, good test, defective test, source size (H, W))
    "256px": (40, 10, 10, (256, 256)),
    "highres": (60, 27, 100, (2048, 2448)),
}


def dataset(cache: Path, name: str) -> Path:
    from lit_anomaly.data import write_synthetic

    train, good, bad, size = SETS[name]
    root = cache / f"export_speed_{name}"
    if not (root / ".complete").exists():
        write_synthetic(root, "MVTecAD", ["bottle"], train, good, bad, image_size=size)
        (root / ".complete").touch()
    return root


def whole_process(command: list[str], repeats: int) -> float:
    """Median wall seconds of `command` from launch to exit; each run writes into a fresh folder (`{out}`)."""
    times = []
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp()) / "out"
        started = time.perf_counter()
        done = subprocess.run([part.replace("{out}", str(out)) for part in command], capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stderr[-1500:]}")
        shutil.rmtree(out.parent, ignore_errors=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lit-anomaly-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = parser.parse_args()

    from lit_anomaly.cli import main as cli
    from lit_anomaly.export import export_bundle

    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp())
    for name in args.sets:
        root = dataset(Path(args.cache), name)
        test = root / "bottle" / "test"
        one = work / name / "one"
        one.mkdir(parents=True)
        shutil.copy(next(test.rglob("*.png")), one)
        fit = work / name / "fit"
        code = cli([
            "fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
            "--data", "MVTecAD", "--data.root", str(root), "--data.category", "bottle",
            "--data.image_size", "[256,256]", "--trainer.default_root_dir", str(fit),
        ])  # fmt: skip
        assert code == 0, "fit failed"
        checkpoint = next(fit.rglob("detector.ckpt"))
        latency, bundles = {}, {}
        for format_name in ("onnx", "openvino"):
            bundles[format_name] = work / name / format_name
            parity = export_bundle(checkpoint, format_name, bundles[format_name], "fp32", test).parity
            assert parity.passed, parity.failure()
            latency |= parity.latency_ms_per_image
            latency[f"pytorch_beside_{format_name}"] = latency.pop("pytorch")
        images = parity.images
        predict = [str(bin_dir / "lit-anomaly"), "predict", "--ckpt_path", str(checkpoint),
                   "--trainer.default_root_dir", "{out}", "--data.num_workers", "0"]  # fmt: skip
        infer = [str(bin_dir / "lit-anomaly-infer"), "--bundle", str(bundles["onnx"]), "--output", "{out}"]
        first = {
            "lit-anomaly predict": whole_process([*predict, "--data.predict_dir", str(one)], args.repeats),
            "lit-anomaly-infer (onnx)": whole_process([*infer, "--input", str(one)], args.repeats),
        }
        folder = {
            "lit-anomaly predict": whole_process([*predict, "--data.predict_dir", str(test)], 1),
            "lit-anomaly-infer (onnx)": whole_process([*infer, "--input", str(test)], 1),
        }
        print(json.dumps({
            "set": name, "test_images": images, "latency_ms_per_image": latency,
            "first_result_s": {k: round(v, 2) for k, v in first.items()},
            "first_result_speedup": round(first["lit-anomaly predict"] / first["lit-anomaly-infer (onnx)"], 1),
            "whole_folder_s": {k: round(v, 2) for k, v in folder.items()},
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
