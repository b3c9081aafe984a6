"""The inference engines a bundle runs on: ONNX Runtime and OpenVINO, each imported only when used."""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

from .bundle import Bundle

EXTRA = "pip install 'lit-anomaly-runtime[{engine}]' (or 'lit-anomaly[export]' beside the training stack)"
ENGINE_PACKAGES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}


class EngineMissing(RuntimeError):
    """The package an engine needs is not installed; the message names the pip extra."""


class Engine(Protocol):
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, H, W) uint8 images at the fitted size to scores (N,) and maps (N, H, W), float32."""


def require(format_name: str) -> Any:
    """The engine module for a bundle `format_name`, or EngineMissing naming what to install."""
    package, extra = ENGINE_PACKAGES[format_name]
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise EngineMissing(
            f"{format_name} bundles need {package}, which is not installed: " + EXTRA.format(engine=extra)
        ) from error


class OnnxEngine:
    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        ort = require("onnx")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(bundle.model_file), options, providers=["CPUExecutionProvider"])

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, anomaly_map = self.session.run(["score", "anomaly_map"], {"image": images})
        return score, anomaly_map


class OpenVinoEngine:
    def __init__(self, bundle: Bundle, threads: int | None = None, device: str = "CPU") -> None:
        ov = require("openvino")
        # f32 arithmetic: on CPUs with bf16 units OpenVINO otherwise computes in bf16, and scores move by 1e-3
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.model = ov.Core().compile_model(str(bundle.model_file), device, config)
        self.outputs = {output.get_any_name(): output for output in self.model.outputs}

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.model(images)
        return result[self.outputs["score"]], result[self.outputs["anomaly_map"]]


def open_engine(bundle: Bundle, threads: int | None = None) -> Engine:
    return (OnnxEngine if bundle.format == "onnx" else OpenVinoEngine)(bundle, threads)
