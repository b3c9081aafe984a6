"""`lit-anomaly-infer`: score a folder of images with an exported bundle, without torch, writing what
`lit-anomaly predict` writes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .bundle import BundleError
from .engines import EngineMissing
from .files import RunError, holds_anything, sanitize
from .image import ImageError
from .inferencer import Inferencer
from .outputs import images_below, map_at_image_size, output_names, prediction_line, write_map_files
from .signals import DeferredSignals

PROG = "lit-anomaly-infer"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score images with a bundle from `lit-anomaly export` (ONNX Runtime or OpenVINO, no torch). "
        "Writes predictions.jsonl and anomaly maps as `lit-anomaly predict` does.",
    )
    parser.add_argument("--bundle", required=True, help="the bundle folder written by lit-anomaly export")
    parser.add_argument("--input", required=True, help="folder of images, searched recursively")
    parser.add_argument("--output", required=True, help="new or empty folder for predictions.jsonl and the maps")
    parser.add_argument(
        "--save-maps", "--save_maps", default="true", choices=("true", "false"),
        help="write anomaly_images/ (float TIFF maps at each image's size) and anomaly_images_thresholded/",
    )  # fmt: skip
    parser.add_argument("--batch-size", "--batch_size", type=int, default=8, help="images per engine call")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of the engine")
    parser.add_argument(
        "--category", default=None,
        help="decide with this category's own threshold (a detector fitted on several categories at once)",
    )  # fmt: skip
    return parser


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise RunError(f"--batch-size must be a positive number of images, got {args.batch_size}")
    folder, output = Path(args.input).expanduser(), Path(args.output).expanduser()
    if not folder.is_dir():
        raise RunError(f"--input {folder} does not exist or is not a folder")
    if holds_anything(output):
        raise RunError(f"--output {output} is not empty (an earlier run's results?); move it away or write elsewhere")
    inferencer = Inferencer(args.bundle, args.threads, args.category)
    images = images_below(folder)
    if not images:
        raise RunError(f"--input {folder} holds no images")
    data = inferencer.bundle.metadata.get("data") or {}
    category, split = (
        sanitize(str(args.category or data.get("category") or "custom")),
        sanitize(str(data.get("predict_split") or "predict")),
    )
    names, threshold, save_maps = output_names(images), inferencer.threshold, args.save_maps == "true"
    output.mkdir(parents=True, exist_ok=True)

    def load(index: int) -> tuple[int, np.ndarray | None, tuple[int, int] | None, str | None]:
        try:
            return index, *inferencer.load(images[index], str(images[index])), None
        except ImageError as error:
            return index, None, None, str(error)

    def write_map(index: int, anomaly_map: np.ndarray, size: tuple[int, int]) -> None:
        write_map_files(output, names[str(images[index])], category, split, map_at_image_size(anomaly_map, size),
                        threshold)  # fmt: skip

    batches = [range(s, min(s + args.batch_size, len(images))) for s in range(0, len(images), args.batch_size)]
    failed = 0
    # decoding and map writing release the GIL: threads overlap them with each other and with the engine, and
    # the next batch decodes while this one is scored
    with (
        ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool,
        DeferredSignals() as stop,
        open(output / "predictions.jsonl", "w") as lines,
    ):
        pending = [pool.submit(load, i) for i in batches[0]]
        for k, indices in enumerate(batches):
            loaded = [future.result() for future in pending]
            pending = [pool.submit(load, i) for i in batches[k + 1]] if k + 1 < len(batches) else []
            records = [(i, prediction_line(i, str(images[i]), category, None, threshold, error))
                       for i, _, _, error in loaded if error is not None]  # fmt: skip
            failed += len(records)
            readable = [(i, array, size) for i, array, size, error in loaded if error is None]
            writes = []
            if readable:
                scores, maps = inferencer.score(np.stack([array for _, array, _ in readable]))
                for (i, _, size), score, anomaly_map in zip(readable, scores, maps, strict=True):
                    records.append((i, prediction_line(i, str(images[i]), category, float(score), threshold)))
                    writes += [pool.submit(write_map, i, anomaly_map, size)] if save_maps else []
            for write in writes:
                write.result()
            lines.writelines(json.dumps(line) + "\n" for _, line in sorted(records, key=lambda pair: pair[0]))
            lines.flush()
            if stop.received is not None:
                for future in pending:
                    future.cancel()
                reason = "interrupted" if stop.received == signal.SIGINT else "terminated (SIGTERM)"
                done = indices.stop
                print(f"{PROG}: error: {reason}; {done} of {len(images)} images are in {output}", file=sys.stderr)
                return stop.exit_status
    if failed:
        print(f"{PROG}: error: {failed} of {len(images)} images could not be read; see {output}", file=sys.stderr)
        return 1
    print(f"{PROG}: {len(images)} images scored; predictions in {output / 'predictions.jsonl'}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0; 1 when some image could not be read; 2 for bad input (bundle, folders, engine); 130 or
    143 when stopped by SIGINT or SIGTERM (the lines written are whole)."""
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (BundleError, EngineMissing, RunError, ImageError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def command() -> None:
    sys.exit(main())
