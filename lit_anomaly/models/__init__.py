"""Detectors: AnomalyModule lifecycles over pure nn.Module models."""

from .base import AnomalyModule
from .padim import PaDiM
from .patchcore import PatchCore

MODELS = {cls.__name__: cls for cls in (PatchCore, PaDiM)}

__all__ = ["MODELS", "AnomalyModule", "PaDiM", "PatchCore"]
