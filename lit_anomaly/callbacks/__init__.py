from .predictions import PredictionWriter
from .results import ResultCollector, result_collector
from .tensorboard import TensorBoardArtifacts

__all__ = ["PredictionWriter", "ResultCollector", "TensorBoardArtifacts", "result_collector"]
