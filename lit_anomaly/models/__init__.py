"""Detectors: AnomalyModule lifecycles over pure nn.Module models."""

from .base import AnomalyModule, TrainedAnomalyModule
from .padim import PaDiM
from .patchcore import PatchCore
from .reverse_distillation import ReverseDistillation
from .stfpm import STFPM

MODELS = {cls.__name__: cls for cls in (PatchCore, PaDiM, STFPM, ReverseDistillation)}

__all__ = ["MODELS", "STFPM", "AnomalyModule", "PaDiM", "PatchCore", "ReverseDistillation", "TrainedAnomalyModule"]
