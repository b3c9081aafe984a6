"""An exported detector on disk: the model files and metadata.json, checked before anything runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLE_FORMAT = 1
METADATA = "metadata.json"
MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the folder or file and what is expected."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A checked bundle: its folder and metadata.json."""

    path: Path
    metadata: dict[str, Any]

    @property
    def format(self) -> str:
        return self.metadata["format"]

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILES[self.format][0]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.metadata["input"]["size"])

    @property
    def threshold(self) -> float | None:
        return self.metadata["threshold"]["value"]

    def threshold_for(self, category: str | None) -> float | None:
        """The threshold deciding for `category`: its own in a unified detector's bundle, else the bundle's one."""
        own = self.metadata["threshold"].get("by_category") or {}
        if category is None:
            return self.threshold
        if category not in own:
            known = f"one of {', '.join(own)}" if own else "none: the detector was fitted on one category"
            raise BundleError(f"--category {category}: the bundle in {self.path} has no threshold for it ({known})")
        return own[category]["value"]


def load_bundle(path: str | Path) -> Bundle:
    """The bundle in `path`, refused in one line when its folder, metadata or any model file is missing, its
    format version is not this runtime's, or a model file's SHA-256 differs from the one metadata.json records."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise BundleError(f"--bundle {folder} does not exist or is not a folder; expected a lit-anomaly export")
    try:
        metadata = json.loads((folder / METADATA).read_text())
    except FileNotFoundError as error:
        raise BundleError(
            f"--bundle {folder} has no {METADATA}; expected a folder written by lit-anomaly export"
        ) from error
    except (OSError, ValueError) as error:
        raise BundleError(f"{folder / METADATA} is not readable JSON ({error})") from error
    version = metadata.get("bundle_format") if isinstance(metadata, dict) else None
    if version != BUNDLE_FORMAT:
        raise BundleError(
            f"{folder / METADATA}: bundle format {version!r}, but this runtime reads format {BUNDLE_FORMAT}; "
            "export the detector again with this version of lit-anomaly, or install the version that wrote it "
            f"(lit-anomaly {metadata.get('lit_anomaly_version') if isinstance(metadata, dict) else None})"
        )
    if metadata.get("format") not in MODEL_FILES:
        raise BundleError(f"{folder / METADATA}: unknown model format {metadata.get('format')!r}")
    recorded = metadata.get("files") or {}
    for name in MODEL_FILES[metadata["format"]]:
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{file} is missing from the bundle; export the detector again")
        expected = (recorded.get(name) or {}).get("sha256")
        if expected is None or file_sha256(file) != expected:
            raise BundleError(
                f"{file} does not match the SHA-256 that {METADATA} records: the file was changed or damaged; "
                "copy the bundle again or export the detector again"
            )
    return Bundle(folder, metadata)
