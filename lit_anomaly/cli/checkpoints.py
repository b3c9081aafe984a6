"""Checkpoints on the command line: the source of the classes they were fit with."""

from __future__ import annotations

import json
from typing import Any

from ..models.checkpoints import CheckpointError
from .arguments import flag_values


def with_checkpoint_classes(args: list[str], path: str, checkpoint: dict[str, Any]) -> list[str]:
    """`args` of `predict` (or `test`, `validate`) `--ckpt_path` with the detector and the dataset family (its
    root, category and image size) the checkpoint was fit with, where neither the command line nor a --config
    names them: on the line, `lit-anomaly predict --ckpt_path detector.ckpt --data.predict_dir /incoming` is
    the whole command, and `lit-anomaly test --ckpt_path detector.ckpt` tests on the category it was fit on."""
    classes, data_args = checkpoint.get("classes") or {}, checkpoint.get("datamodule_hyper_parameters") or {}
    held = (classes.get("model") or "").rpartition(".")[2]
    for given in flag_values(args, "--model"):
        named = given.replace(".", "_").isidentifier()  # a name or class path, not an inline dict
        if held and named and given.rpartition(".")[2] != held:  # another class cannot take a `held`'s weights
            raise CheckpointError(
                f"--model {given} contradicts --ckpt_path {path}, which holds a {held}; leave --model out (the "
                f"checkpoint names its detector) or give the checkpoint of a {given}"
            )
    if flag_values(args, "--config"):
        return args
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
