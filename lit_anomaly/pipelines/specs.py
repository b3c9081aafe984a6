"""Class specs: a detector or dataset named on the command line, in a config or in Python, built per category."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..data import DATAMODULES, AnomalyDataModule
from ..models import MODELS, AnomalyModule
from ..models.lifecycle import class_path


@dataclass
class Spec:
    """A class and its init arguments: every category gets a fresh instance built from it."""

    cls: type
    init_args: dict[str, Any]
    instance: Any = None

    @property
    def name(self) -> str:
        return self.cls.__name__

    def build(self, **overrides: Any) -> Any:
        """A fresh instance: with `overrides`, built; without, a copy of `instance`, the one built (or given)
        first. Every category then starts from the same detector, and copying is cheap where building is not
        (a large backbone's random initialisation takes seconds)."""
        if overrides:
            return self.cls(**{**self.init_args, **overrides})
        if self.instance is None:
            self.instance = self.cls(**self.init_args)
        return copy.deepcopy(self.instance)

    def as_config(self) -> dict[str, Any]:
        return {"class_path": class_path(self.cls), "init_args": self.init_args}


def _resolve_class(name: str, registry: Mapping[str, type], base: type, flag: str) -> type:
    if name in registry:
        return registry[name]
    if "." in name:
        module, _, attribute = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, base):
            return cls
    raise ValueError(f"unknown {flag} {name!r}; valid: {', '.join(registry)}")


def as_spec(value: Any, registry: Mapping[str, type], base: type, flag: str) -> Spec:
    """A Spec from a name, a class, a LightningCLI-style {class_path, init_args} dict, or an instance."""
    if isinstance(value, Spec):
        return value
    if isinstance(value, base):
        init_args = {k: v for k, v in value.hparams.items() if not k.startswith("_")}  # LightningCLI's _class_path
        return Spec(type(value), init_args, value)
    if isinstance(value, type) and issubclass(value, base):
        return Spec(value, {})
    if isinstance(value, str):
        return Spec(_resolve_class(value, registry, base, flag), {})
    if isinstance(value, Mapping) and "class_path" in value:
        return Spec(_resolve_class(value["class_path"], registry, base, flag), dict(value.get("init_args") or {}))
    raise ValueError(f"{flag} must be a name ({', '.join(registry)}), a class, a config dict or an instance")


def model_spec(value: Any) -> Spec:
    return as_spec(value, MODELS, AnomalyModule, "--model")


def data_spec(value: Any) -> Spec:
    return as_spec(value, DATAMODULES, AnomalyDataModule, "--data")
