"""The raw command line, read before LightningCLI parses it."""

from __future__ import annotations

from collections.abc import Sequence

from ..data import DATAMODULES
from ..models import MODELS


def flag_values(args: Sequence[str], flag: str) -> list[str]:
    """The values given for `flag` in `args`, as `--flag VALUE` or `--flag=VALUE`."""
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]
    return values + [arg.partition("=")[2] for arg in args if arg.startswith(flag + "=")]


def check_class_names(args: Sequence[str]) -> None:
    """Unknown --model/--data names get one line listing the valid ones (before jsonargparse's long usage)."""
    for flag, registry in (("--model", MODELS), ("--data", DATAMODULES)):
        for value in flag_values(args, flag):
            is_name = value.isidentifier()  # not a dotted class path, a dict or a file
            if is_name and value not in registry:
                raise ValueError(f"unknown {flag} {value!r}; valid: {', '.join(registry)}")
