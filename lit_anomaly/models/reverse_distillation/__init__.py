from .lightning_model import ReverseDistillation
from .torch_model import ReverseDistillationModel

__all__ = ["ReverseDistillation", "ReverseDistillationModel"]
