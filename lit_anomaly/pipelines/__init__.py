from .benchmark import RunConfig, run_benchmark, run_benchmark_all, run_benchmark_category

__all__ = ["RunConfig", "run_benchmark", "run_benchmark_all", "run_benchmark_category"]
