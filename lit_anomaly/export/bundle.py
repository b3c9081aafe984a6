"""Write a bundle: the exported model files, metadata.json, and a parity check, in a folder renamed into place."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..models import AnomalyModule
from ..models.checkpoints import CheckpointError, check_checkpoint
from ..pipelines.specs import model_spec
from ..runtime.bundle import BUNDLE_FORMAT, METADATA, MODEL_FILES, file_sha256
from ..runtime.engines import require
from ..runtime.files import RunError, check_output_folder, holds_anything, to_json
from ..runtime.image import DEFAULT_MAX_IMAGE_PIXELS
from .check import ParityReport, check_parity
from .graph import onnx_to_fp16, onnx_to_openvino, to_onnx

FORMATS = tuple(MODEL_FILES)
PRECISIONS = ("fp32", "fp16")


class ExportError(ValueError):
    """An export that cannot be made; the message names the flag or file."""


@dataclass
class ExportResult:
    """Where the bundle went, and its parity check (None without --check)."""

    path: Path
    metadata: dict[str, Any]
    parity: ParityReport | None


def load_detector(ckpt_path: str | Path) -> tuple[AnomalyModule, dict[str, Any]]:
    """The fitted detector of a lit-anomaly checkpoint, in eval mode on CPU, and the checkpoint's dict."""
    checkpoint = check_checkpoint(ckpt_path)
    classes = checkpoint.get("classes") or {}
    if not classes.get("model"):
        raise CheckpointError(f"--ckpt_path {ckpt_path} does not name its detector class (lit-anomaly before 0.2)")
    cls = model_spec(classes["model"]).cls
    accepted = inspect.signature(cls).parameters
    # the state dict holds every weight: building the backbone needs neither downloads nor the weights file
    overrides = {k: v for k, v in (("pretrained", False), ("weights_path", None)) if k in accepted}
    detector = cls.load_from_checkpoint(str(ckpt_path), map_location="cpu", **overrides).eval()
    if not bool(detector.fitted) or not any(detector.fit_image_size.tolist()):
        raise ExportError(
            f"--ckpt_path {ckpt_path} holds a {cls.__name__} that was never fitted; export the detector.ckpt that "
            "lit-anomaly fit (or fit+test --run.checkpoints true) writes"
        )
    return detector, checkpoint


def describe(detector: AnomalyModule, checkpoint: dict[str, Any], format_name: str, precision: str) -> dict[str, Any]:
    """metadata.json without the files' hashes: what the bundle is, takes, returns and decides."""
    height, width = (int(v) for v in detector.fit_image_size.tolist())
    arguments = {k: v for k, v in detector.hparams.items() if not k.startswith("_")}
    extractor = detector.model.extractor
    data_args = checkpoint.get("datamodule_hyper_parameters") or {}
    calibration = detector.calibration
    return {
        "bundle_format": BUNDLE_FORMAT,
        "lit_anomaly_version": __version__,
        "format": format_name,
        "precision": precision,
        "detector": {
            "class": type(detector).__name__,
            "class_path": (checkpoint.get("classes") or {}).get("model"),
            "arguments": json.loads(json.dumps(arguments, default=str)),
            "backbone": extractor.backbone,
            "layers": list(arguments.get("layers", [])),
        },
        "data": {
            "class_path": (checkpoint.get("classes") or {}).get("data"),
            "category": data_args.get("category"),
            "predict_split": data_args.get("predict_split"),
        },
        "input": {
            "name": "image",
            "layout": "NCHW",
            "dtype": "uint8",
            "channels": "RGB",
            "size": [height, width],
            "batch": "dynamic",
            "max_image_pixels": data_args.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            "preprocessing": "EXIF orientation applied; any mode to RGB; resized to size with antialiased bilinear "
            "uint8 resampling (torch's kernel; lit_anomaly.runtime.image.resize_uint8 is the same to the bit)",
        },
        "normalisation": {
            "inside_graph": True,
            "scale": 1 / 255,
            "mean": extractor.mean.flatten().tolist(),
            "std": extractor.std.flatten().tolist(),
        },
        "threshold": {
            "value": detector.calibrated_threshold,
            "provenance": calibration.provenance() if calibration is not None else None,
            # a unified detector's own threshold per category (lit-anomaly-infer --category); {} for one category
            "by_category": {
                category: {"value": own.threshold, "provenance": own.provenance()}
                for category, own in (calibration.categories if calibration is not None else {}).items()
            },
        },
        "score": "the raw image score (the anomaly map's maximum, PatchCore's reweighted when reweight is on); "
        "pred = score > threshold (strictly)",
        "anomaly_map": "raw per-pixel anomaly at the fitted size (distance to normal, upsampled and blurred); "
        "resized bilinearly to each image's size on output",
        "outputs": [
            {"name": "score", "shape": ["batch"], "dtype": "float32"},
            {"name": "anomaly_map", "shape": ["batch", height, width], "dtype": "float32"},
        ],
    }


def _check_output(output: Path) -> None:
    if holds_anything(output):
        raise RunError(f"--output {output} exists and is not an empty folder; choose a new folder for the bundle")
    check_output_folder(output, "--output")  # no file in the way, and writable where it will be made


def export_bundle(
    ckpt_path: str | Path,
    format_name: str,
    output: str | Path,
    precision: str = "fp32",
    check_dir: str | Path | None = None,
) -> ExportResult:
    """Export the detector of `ckpt_path` to a bundle at `output`, after the parity check on `check_dir`'s
    images where given. A failed export or check leaves nothing at `output`."""
    if format_name not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {format_name!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    output = Path(output).expanduser()
    _check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    require(format_name)  # before the work: name the pip extra now, not after tracing
    detector, checkpoint = load_detector(ckpt_path)
    metadata = describe(detector, checkpoint, format_name, precision)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        onnx_path = staging / "model.onnx"
        to_onnx(detector, onnx_path, tuple(metadata["input"]["size"]))
        if format_name == "onnx" and precision == "fp16":
            onnx_to_fp16(onnx_path)
        if format_name == "openvino":
            onnx_to_openvino(onnx_path, staging / "model.xml", precision == "fp16")
            onnx_path.unlink()
        for leftover in set(p.name for p in staging.iterdir()) - set(MODEL_FILES[format_name]):
            (staging / leftover).unlink()  # an exporter's side files (external data) never ship
        metadata["files"] = {name: {"sha256": file_sha256(staging / name)} for name in MODEL_FILES[format_name]}
        (staging / METADATA).write_text(to_json(metadata))
        parity = check_parity(detector, staging, check_dir, precision) if check_dir is not None else None
        if parity is not None:
            metadata["check"] = parity.summary()
            (staging / METADATA).write_text(to_json(metadata))
            if not parity.passed:
                return ExportResult(output, metadata, parity)
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
        return ExportResult(output, metadata, parity)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
