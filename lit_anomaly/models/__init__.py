"""Detectors: AnomalyModule lifecycles over pure nn.Module models."""

from .lifecycle import AnomalyModule, ResultListener
from .padim import PaDiM
from .patchcore import PatchCore
from .reverse_distillation import ReverseDistillation
from .stfpm import STFPM
from .trained import TrainedAnomalyModule

MODELS = {cls.__name__: cls for cls in (PatchCore, PaDiM, STFPM, ReverseDistillation)}

__all__ = [
    "MODELS", "STFPM", "AnomalyModule", "PaDiM", "PatchCore", "ResultListener", "ReverseDistillation",
    "TrainedAnomalyModule",
]  # fmt: skip
