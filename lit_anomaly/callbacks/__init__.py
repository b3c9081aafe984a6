from .tensorboard import TensorBoardArtifacts

__all__ = ["TensorBoardArtifacts"]
