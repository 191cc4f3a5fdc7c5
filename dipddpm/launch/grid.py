"""Grid files: a base config plus axes, expanded to one point per combination.

    # configs/grids/t_epochs.yaml
    base: ../ddpm.yaml            # relative to this file; `--config` on the command line wins
    axes:
      diffusion.T: [200, 400, 600]
      train.epochs: [5, 10]

expands to 6 points in row-major order (the last axis changes fastest), each a dict
{"diffusion.T": 200, "train.epochs": 5} with a run name such as `T=200,epochs=5`. Values
become `key=value` overrides, so each task's resolved config.yaml shows its grid values.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from dipddpm.config import ConfigError


@dataclass
class Grid:
    path: Path
    base: Optional[Path]  # the config the axes vary, resolved against the grid file's folder
    axes: dict[str, list]

    def points(self) -> list[dict[str, Any]]:
        return expand(self.axes)


def load_grid(path) -> Grid:
    """Read and check a grid file; any problem is a ConfigError naming the file and key."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such grid file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a grid file is a mapping with 'base' and 'axes'")
    unknown = sorted(set(tree) - {"base", "axes"})
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key; a grid file has base, axes")
    base = tree.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base = {base!r}: must be a config file name")
    axes = tree.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"{path}: axes: must map at least one config key to a list of values")
    for key, values in axes.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", key):
            raise ConfigError(f"{path}: axes: {key!r}: keys look like section.field")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axes.{key} = {values!r}: must be a non-empty list")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"{path}: axes.{key} = {values!r}: values repeat")
        for v in values:
            if isinstance(v, dict):
                raise ConfigError(f"{path}: axes.{key}: {v!r}: values are scalars or lists")
    return Grid(path=path, base=(path.parent / base) if base else None, axes=dict(axes))


def expand(axes: dict[str, list]) -> list[dict[str, Any]]:
    """The cartesian product of the axes, last axis fastest."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def override_value(value: Any) -> str:
    """A value as override text that the config parser reads back as the same value.

    Strings go as typed (a str field takes the raw text); everything else as JSON, which is
    YAML flow syntax (numbers, true/false, null, lists).
    """
    return value if isinstance(value, str) else json.dumps(value)


def as_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{key}={override_value(value)}" for key, value in point.items()]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that is unique among the keys."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(1 for k in keys if k == suffix or k.endswith("." + suffix)) == 1:
                out[key] = suffix
                break
    return out


def run_name(point: dict[str, Any]) -> str:
    """`T=200,epochs=5`: readable, and safe as a folder name."""
    if not point:
        return "base"
    short = _short_keys(list(point))
    name = ",".join(f"{short[k]}={override_value(v)}" for k, v in point.items())
    return re.sub(r"[^\w.,=+\-]", "_", name)
