"""Checkpoints on the command line: refused early when unreadable, and the source of the classes they were fit with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .arguments import flag_values


class CheckpointError(ValueError):
    """A --ckpt_path that is not a readable Lightning checkpoint; the message names the file."""


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path`; refused, before anything runs, if missing, a folder, truncated, empty, not a
    torch file or not Lightning's. Loaded with weights_only=True: a pickle payload never runs."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"--ckpt_path {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path {path} is not a file; expected a .ckpt written by lit-anomaly fit")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"--ckpt_path {path} is not a readable checkpoint (truncated or not one): {reason}"
        ) from error
    if not isinstance(state, dict) or "state_dict" not in state or "pytorch-lightning_version" not in state:
        raise CheckpointError(f"--ckpt_path {path} is a torch file but not a Lightning checkpoint (no state_dict)")
    return state


def with_checkpoint_classes(args: list[str], path: str, checkpoint: dict[str, Any]) -> list[str]:
    """`args` of `predict` (or `test`, `validate`) `--ckpt_path` with the detector and the dataset family (its
    root, category and image size) the checkpoint was fit with, where neither the command line nor a --config
    names them: on the line, `lit-anomaly predict --ckpt_path detector.ckpt --data.predict_dir /incoming` is
    the whole command, and `lit-anomaly test --ckpt_path detector.ckpt` tests on the category it was fit on."""
    if flag_values(args, "--config"):
        return args
    classes, data_args = checkpoint.get("classes") or {}, checkpoint.get("datamodule_hyper_parameters") or {}
    if not classes and not (flag_values(args, "--model") and flag_values(args, "--data")):
        raise CheckpointError(
            f"--ckpt_path {path} does not name its detector and dataset classes (lit-anomaly before 0.2): give "
            "--config, or --model and --data, as when it was fit"
        )
    extra = ["--model", classes["model"]] if classes.get("model") and not flag_values(args, "--model") else []
    if classes.get("data") and not flag_values(args, "--data"):
        extra += ["--data", classes["data"]]
        for key in ("root", "category", "image_size"):
            if key in data_args:  # a string as it is: JSON would quote a root
                value = data_args[key]
                extra.append(f"--data.{key}={value if isinstance(value, str) else json.dumps(value)}")
    return [args[0], *extra, *args[1:]]
