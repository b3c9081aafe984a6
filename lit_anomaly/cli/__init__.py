"""The `lit-anomaly` command: LightningCLI's subcommands, fit+test and compare."""

from ..models.checkpoints import CheckpointError, check_checkpoint
from .app import AnomalyTrainer, LitAnomalyCLI, main

__all__ = ["AnomalyTrainer", "CheckpointError", "LitAnomalyCLI", "check_checkpoint", "main"]
