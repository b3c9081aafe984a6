from .lightning_model import PatchCore
from .torch_model import PatchCoreModel

__all__ = ["PatchCore", "PatchCoreModel"]
