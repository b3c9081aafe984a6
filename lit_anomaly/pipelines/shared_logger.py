"""A logger of the caller's (`--trainer.logger`), shared by every category of a fit+test run."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger
from torch import nn


def share(logger: Any) -> Any:
    """`logger` (a Trainer's `logger` argument) with every Logger in it made a `SharedLogger`."""
    if isinstance(logger, Logger):
        return SharedLogger(logger)
    return [share(item) for item in logger] if isinstance(logger, list | tuple) else logger


def for_category(logger: Any, category: str) -> Any:
    """`logger` (a Trainer's `logger` argument) with every `SharedLogger` in it made `category`'s view."""
    if isinstance(logger, SharedLogger):
        return logger.category(category)
    return [for_category(item, category) for item in logger] if isinstance(logger, list) else logger


def finalize(logger: Any, status: str) -> None:
    """Finalise every `SharedLogger` in `logger` (a Trainer's `logger` argument) with `status`."""
    for item in logger if isinstance(logger, list) else [logger]:
        if isinstance(item, SharedLogger):
            item.finalize(status)


class SharedLogger:
    """One run's logger, handed to each category's Trainer as a `CategoryLogger`.

    Each category's Trainer counts its steps from 0 and logs the same metric names, so a logger handed to all
    of them as it is gets one category's `test/image_auroc` over another's at the same step: CSVLogger wrote
    rows nobody could attribute, and a logger with one series per name (TensorBoard, MLflow) mixes the
    categories in it. Through this, each category logs under its name, at steps after the previous
    category's (so no logger sees a step go back), and the logger is finalised once, after the last one.

    Args:
        logger: the caller's logger.
    """

    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self.next_step = 0

    def category(self, name: str) -> CategoryLogger:
        return CategoryLogger(self, name, first_step=self.next_step)

    def finalize(self, status: str) -> None:
        self.logger.finalize(status)


class CategoryLogger(Logger):
    """One category's view of a `SharedLogger`: metric names under `category/`, steps from `first_step` on.

    Args:
        shared: the run's logger.
        category: the category name metrics are logged under.
        first_step: the step this category's step 0 is logged at.
    """

    def __init__(self, shared: SharedLogger, category: str, first_step: int) -> None:
        super().__init__()
        self.shared, self.category, self.first_step = shared, category, first_step

    @property
    def logger(self) -> Logger:
        return self.shared.logger

    @property
    def name(self) -> str | None:
        return self.logger.name

    @property
    def version(self) -> int | str | None:
        return self.logger.version

    @property
    def root_dir(self) -> str | None:
        return self.logger.root_dir

    @property
    def log_dir(self) -> str | None:
        return self.logger.log_dir

    @property
    def save_dir(self) -> str | None:
        return self.logger.save_dir

    @property
    def experiment(self) -> Any:
        return self.logger.experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self.first_step + (step or 0)
        self.shared.next_step = max(self.shared.next_step, step + 1)
        separator = self.logger.group_separator
        self.logger.log_metrics({f"{self.category}{separator}{key}": value for key, value in metrics.items()}, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.logger.log_hyperparams(params, *args, **kwargs)

    def log_graph(self, model: nn.Module, input_array: Any = None) -> None:
        self.logger.log_graph(model, input_array)

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        self.logger.after_save_checkpoint(checkpoint_callback)

    def save(self) -> None:
        self.logger.save()

    def finalize(self, status: str) -> None:
        self.logger.save()  # the run's next category goes on logging: `SharedLogger.finalize` ends it
