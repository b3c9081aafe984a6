"""Failures as one line: our own errors' messages, jsonargparse's nested reports reduced to the flag and value."""

from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Sequence

import yaml
from jsonargparse import ArgumentError
from lightning_fabric.utilities.exceptions import MisconfigurationException

from ..data import DatasetError
from ..export import ExportError
from ..models.checkpoints import CheckpointError
from ..models.components import BackboneError
from ..runtime.bundle import BundleError
from ..runtime.engines import EngineMissing
from ..runtime.files import RunError
from ..runtime.image import ImageError
from .arguments import flag_values

OUR_ERRORS = (
    DatasetError, BackboneError, RunError, CheckpointError, BundleError, ImageError, ExportError, EngineMissing,
)  # fmt: skip
INPUT_ERRORS = (ArgumentError, ValueError, BackboneError, RunError, FileNotFoundError, MisconfigurationException)


def parse_error(chain: list[BaseException], args: Sequence[str]) -> str | None:
    """jsonargparse's nested union report, as one line naming the flag: `--model.x: got 'abc', expected float`."""
    for error in chain:
        if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
            config = (flag_values(args, "--config") or ["config"])[-1]
            mark = error.problem_mark
            return f"--config {config}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    keys = []
    for error in chain:
        match = re.match(r'Parser key "([^"]+)"', str(error))
        if match and (not keys or keys[-1] != match.group(1)):
            keys.append(match.group(1))
    if not keys:
        return None
    innermost = str(chain[-1])
    given = re.search(r"Got value: (.*)$", innermost)
    subtypes = [re.findall(r"Subtypes: \[(.*)\]", str(e)) for e in chain]
    expected = next((found[-1] for found in reversed(subtypes) if found), None)
    if expected:
        expected = " or ".join(re.sub(r"<class '([\w.]+)'>", r"\1", t).strip() for t in expected.split(", "))
    flag = "--" + ".".join(keys)
    if given and expected:
        return f"{flag}: got {given.group(1)!r}, expected {expected}"
    return f"{flag}: {innermost.splitlines()[0]}"


def error_message(error: BaseException, args: Sequence[str] = ()) -> str:
    """Our own error's message where there is one, else the flag and value jsonargparse choked on, else the
    root cause's first line: jsonargparse wraps a constructor's error in a long union report."""
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 50:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    ours = next((e for e in chain if isinstance(e, OUR_ERRORS)), None)
    if ours is None:
        ours = next((e for e in chain if type(e) is ValueError and str(e).startswith("--")), None)
    if ours is not None:
        text = str(ours).strip()
        return text if isinstance(ours, DatasetError) else text.splitlines()[0]
    parsed = parse_error(chain, args)
    if parsed:
        return parsed
    root = chain[-1]
    if missing := re.match(r"the following arguments are required: (.*)", str(root)):
        flags = " and ".join(f"--{name.split('.', 1)[-1]}" for name in missing.group(1).split(", "))
        return f"{flags} required (or a --config that gives them)"
    text = (str(root).strip().splitlines() or [""])[0]
    return text if text and isinstance(root, INPUT_ERRORS) else f"{type(root).__name__}: {text}".rstrip(": ")


def fail(message: str, status: int, error: BaseException | None = None) -> int:
    """Print `message` as the one `lit-anomaly: error:` line (after the traceback, when given); return `status`."""
    if error is not None:
        traceback.print_exception(error, file=sys.stderr)
    print(f"lit-anomaly: error: {message}", file=sys.stderr)
    return status
