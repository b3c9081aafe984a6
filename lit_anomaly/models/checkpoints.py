"""A detector's checkpoint read safely: refused early when it is not one, loaded without running pickled code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


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
