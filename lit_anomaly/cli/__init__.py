"""The `lit-anomaly` command: LightningCLI's subcommands, fit+test and compare."""

from .app import AnomalyTrainer, LitAnomalyCLI, main
from .checkpoints import CheckpointError, check_checkpoint

__all__ = ["AnomalyTrainer", "CheckpointError", "LitAnomalyCLI", "check_checkpoint", "main"]
