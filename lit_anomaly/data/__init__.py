"""Datamodules: one per dataset family, all yielding the batch contract of docs/ARCHITECTURE.md."""

from .btad import BTAD
from .datamodule import AnomalyDataModule
from .folder import Folder
from .mvtec import MVTecAD, MVTecAD2, MVTecLOCO
from .samples import DatasetError, Sample
from .synthetic import SyntheticMVTecAD, write_synthetic
from .unified import UnifiedDataModule
from .visa import VisA

DATAMODULES = {cls.__name__: cls for cls in (MVTecAD, MVTecAD2, MVTecLOCO, BTAD, VisA, Folder, SyntheticMVTecAD)}

__all__ = [
    "BTAD", "DATAMODULES", "AnomalyDataModule", "DatasetError", "Folder", "MVTecAD", "MVTecAD2",
    "MVTecLOCO", "Sample", "SyntheticMVTecAD", "UnifiedDataModule", "VisA", "write_synthetic",
]  # fmt: skip
