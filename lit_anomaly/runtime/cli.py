"""`lit-anomaly-infer`: score a folder of images with an exported bundle, without torch, writing what
`lit-anomaly predict` writes."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bundle import BundleError
from .engines import EngineMissing
from .files import RunError, sanitize
from .image import ImageError
from .inferencer import Inferencer
from .outputs import images_below, map_at_image_size, output_names, prediction_line, write_map_files

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
    return parser


class Stop:
    """SIGINT and SIGTERM stop the run after the batch in hand: every line written is whole."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __enter__(self) -> Stop:
        self.previous = {s: signal.signal(s, self._take) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _take(self, signum: int, frame: object) -> None:
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise RunError(f"--batch-size must be a positive number of images, got {args.batch_size}")
    folder, output = Path(args.input).expanduser(), Path(args.output).expanduser()
    if not folder.is_dir():
        raise RunError(f"--input {folder} does not exist or is not a folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise RunError(f"--output {output} is not empty (an earlier run's results?); move it away or write elsewhere")
    inferencer = Inferencer(args.bundle, args.threads)
    images = images_below(folder)
    if not images:
        raise RunError(f"--input {folder} holds no images")
    data = inferencer.bundle.metadata.get("data") or {}
    category, split = (
        sanitize(str(data.get("category") or "custom")),
        sanitize(str(data.get("predict_split") or "predict")),
    )
    names, threshold, save_maps = output_names(images), inferencer.threshold, args.save_maps == "true"
    output.mkdir(parents=True, exist_ok=True)
    failed = 0
    with Stop() as stop, open(output / "predictions.jsonl", "w") as lines:
        for start in range(0, len(images), args.batch_size):
            batch, readable = [], []
            for index in range(start, min(start + args.batch_size, len(images))):
                try:
                    batch.append((index, *inferencer.load(images[index], str(images[index]))))
                except ImageError as error:
                    failed += 1
                    line = prediction_line(index, str(images[index]), category, None, threshold, str(error))
                    readable.append((index, line))
            if batch:
                scores, maps = inferencer.score(np.stack([array for _, array, _ in batch]))
                for (index, _, size), score, anomaly_map in zip(batch, scores, maps, strict=True):
                    path = images[index]
                    readable.append((index, prediction_line(index, str(path), category, float(score), threshold)))
                    if save_maps:
                        resized = map_at_image_size(anomaly_map, size)
                        write_map_files(output, names[str(path)], category, split, resized, threshold)
            lines.writelines(json.dumps(line) + "\n" for _, line in sorted(readable, key=lambda pair: pair[0]))
            lines.flush()
            if stop.signal is not None:
                done = min(start + args.batch_size, len(images))
                reason = "interrupted" if stop.signal == signal.SIGINT else "terminated (SIGTERM)"
                print(f"{PROG}: error: {reason}; {done} of {len(images)} images are in {output}", file=sys.stderr)
                return 128 + stop.signal
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
