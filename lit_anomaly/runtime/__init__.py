"""The torch-free runtime: score images with an exported bundle using numpy, Pillow and ONNX Runtime or OpenVINO.

It is also the bottom layer of lit-anomaly: image decoding and atomic files that the training stack shares.
"""

from .bundle import Bundle, BundleError, load_bundle
from .engines import EngineMissing
from .image import ImageError
from .inferencer import Inferencer, Prediction

__all__ = ["Bundle", "BundleError", "EngineMissing", "ImageError", "Inferencer", "Prediction", "load_bundle"]
