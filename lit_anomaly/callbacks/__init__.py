from .predictions import PredictionWriter
from .tensorboard import TensorBoardArtifacts

__all__ = ["PredictionWriter", "TensorBoardArtifacts"]
