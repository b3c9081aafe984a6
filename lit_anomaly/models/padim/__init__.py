from .lightning_model import PaDiM
from .torch_model import PaDiMModel

__all__ = ["PaDiM", "PaDiMModel"]
