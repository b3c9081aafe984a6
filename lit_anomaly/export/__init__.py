"""Export a fitted detector to ONNX or OpenVINO as a bundle that `lit_anomaly.runtime` runs without torch."""

from .bundle import ExportError, ExportResult, export_bundle, load_detector
from .check import ParityReport, check_parity
from .graph import DetectorGraph

__all__ = [
    "DetectorGraph", "ExportError", "ExportResult", "ParityReport", "check_parity", "export_bundle", "load_detector",
]  # fmt: skip
