from .lightning_model import STFPM
from .torch_model import STFPMModel

__all__ = ["STFPM", "STFPMModel"]
