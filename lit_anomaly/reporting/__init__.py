from .run_folder import HEADLINE_METRICS, RunError, RunFolder, aggregate, build_report, environment, write_atomic

__all__ = ["HEADLINE_METRICS", "RunError", "RunFolder", "aggregate", "build_report", "environment", "write_atomic"]
