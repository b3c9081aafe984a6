"""`lit-anomaly export`: a fitted detector to an ONNX or OpenVINO bundle, proven on the user's images."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..export import export_bundle
from ..export.bundle import FORMATS, PRECISIONS


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-anomaly export",
        description="Export a fitted detector (detector.ckpt) to a bundle that lit-anomaly-infer and "
        "lit_anomaly.runtime.Inferencer run without torch.",
    )
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="detector.ckpt written by lit-anomaly fit")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx (ONNX Runtime) or openvino")
    parser.add_argument("--output", required=True, help="the bundle folder to write (new or empty)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="fp32, or fp16 weights")
    parser.add_argument(
        "--check", default=None, metavar="IMAGES_DIR",
        help="score these images with PyTorch and with the export; no bundle unless decisions agree and scores "
        "are within the tolerance (relative 1e-4 at fp32, 2e-2 at fp16)",
    )  # fmt: skip
    return parser


def main(args: Sequence[str], out: object = sys.stdout) -> int:
    """Exit 0 with the bundle written; 1 when the check fails (no bundle); errors raise for the caller's
    one-line report."""
    options = parser().parse_args(list(args))
    result = export_bundle(options.ckpt_path, options.format, options.output, options.precision, options.check)
    if result.parity is not None:
        out.write(json.dumps(result.parity.summary()) + "\n")
        out.flush()
        if not result.parity.passed:
            print(f"lit-anomaly: error: the export failed its check: {result.parity.failure()}; no bundle was "
                  f"written to {result.path}", file=sys.stderr)  # fmt: skip
            return 1
    print(f"lit-anomaly: {options.format} bundle written to {result.path}", file=sys.stderr)
    return 0
