"""Config dumping: str Enum members that YAML's safe dumper cannot write, written as their values."""

from __future__ import annotations

from enum import Enum
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace


def make_dumpable(parser: ArgumentParser, config: Namespace) -> None:
    """Write str Enum members that YAML's safe dumper cannot write as their values, in place, where `config`
    holds any and does not dump as it is. Such a member is the default of a str-typed argument (Lightning's
    `Timer(interval=Interval.step)`), which takes the value just as well; Lightning's CLI dumps the config to
    instantiate the model and failed. An Enum-typed argument, which jsonargparse writes by name, dumps as is
    and keeps its member."""
    if _has_str_enum(config):
        try:
            parser.dump(config, skip_none=False)
        except (yaml.YAMLError, ValueError):  # jsonargparse wraps the dumper's error in its union check's
            _enum_values(config)


def _has_str_enum(value: Any) -> bool:
    if isinstance(value, Namespace):
        value = list(vars(value).values())
    elif isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return any(_has_str_enum(item) for item in value)
    return isinstance(value, Enum) and isinstance(value, str)


def _enum_values(value: Any) -> Any:
    if isinstance(value, Namespace):
        for key, item in vars(value).items():
            setattr(value, key, _enum_values(item))
        return value
    if isinstance(value, list):
        return [_enum_values(item) for item in value]
    if isinstance(value, dict):
        return {key: _enum_values(item) for key, item in value.items()}
    return value.value if isinstance(value, Enum) and isinstance(value, str) else value
