"""Pipelines: the category loop, one category's fit, calibrate and test, and the Trainer rules they share."""

from .category import CategoryOutcome, run_benchmark_category
from .loop import RunConfig, run_benchmark, run_benchmark_all

__all__ = ["CategoryOutcome", "RunConfig", "run_benchmark", "run_benchmark_all", "run_benchmark_category"]
