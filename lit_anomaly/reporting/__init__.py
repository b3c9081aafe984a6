"""Reporting: run folders, the report.json schema, hard cases, report.html and compare. Knows dicts."""

from ..runtime.files import RunError, write_atomic
from .report import HEADLINE_METRICS, aggregate, build_report, environment
from .run_folder import RunFolder

__all__ = ["HEADLINE_METRICS", "RunError", "RunFolder", "aggregate", "build_report", "environment", "write_atomic"]
