"""The raw command line, read before LightningCLI parses it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

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


def check_config_files(args: Sequence[str]) -> None:
    """A --config that is empty, or holds a list or a single value instead of settings, named in one line
    (jsonargparse says only "Unexpected config"). Unreadable and invalid YAML are left to its own report."""
    for value in flag_values(args, "--config"):
        path = Path(value).expanduser()
        try:
            content = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if content is None:
            raise ValueError(f"--config {value} is empty; expected YAML settings such as model:, data: and trainer:")
        if not isinstance(content, dict):
            raise ValueError(
                f"--config {value} holds a {type(content).__name__}, not settings; expected YAML keys such as "
                "model:, data: and trainer:"
            )
