"""A fitted detector as one graph: uint8 images at the fitted size in, image scores and anomaly maps out."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import AnomalyModule
from ..runtime.engines import require

OPSET = 18


class DetectorGraph(nn.Module):
    """The whole detector for export: scaling to [0, 1], the backbone's normalisation, the backbone (BatchNorm
    folded), the detector's distances (nearest neighbours against the memory bank, Mahalanobis, distillation),
    the upsampling and the blur. Takes (N, 3, H, W) uint8; returns scores (N,) and maps (N, H, W), float32."""

    def __init__(self, detector: AnomalyModule) -> None:
        super().__init__()
        self.detector = detector.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        output = self.detector(image.float() / 255.0)  # the loader's float batch: uint8 / 255
        return output["score"].float(), output["anomaly_map"][:, 0].float()


def to_onnx(detector: AnomalyModule, path: Path, image_size: tuple[int, int]) -> None:
    """Write `detector` as an ONNX graph with a dynamic batch (torch.export traces the batch symbolically)."""
    example = torch.zeros(2, 3, *image_size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            DetectorGraph(detector), (example,), dynamo=True, opset_version=OPSET, input_names=["image"],
            output_names=["score", "anomaly_map"], dynamic_shapes={"image": {0: batch}}, verbose=False,
        )  # fmt: skip
        program.save(str(path))


def onnx_to_fp16(path: Path) -> None:
    """The ONNX graph at `path` with float16 weights and arithmetic, uint8 in and float32 out as before."""
    import onnx  # the export extra's; the runtime needs only onnxruntime
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))


def onnx_to_openvino(onnx_path: Path, xml_path: Path, fp16: bool) -> None:
    """The ONNX graph as OpenVINO IR (model.xml and model.bin), with float16 weights for `fp16`."""
    ov = require("openvino")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=fp16)
