"""Sweep spaces as plain data: load a space module, expand its grid, turn a point into overrides.

The contract of a space module (the ones shipped are in the top-level ``tune_spaces`` package,
one per table of the paper; any importable module works):
  ``param_space() -> dict``  dotted config field -> list of values (a grid by default), or the one
                             categorical key ``"row"`` whose values are labels of ``ROWS``;
  ``ROWS``                   (row spaces) label -> dict of dotted overrides, one per table row;
  ``REQUIRES``               (optional) dotted field -> lower bound the driver raises the base
                             config to, so every point of the space is a valid config (top-K of 50
                             needs N_p >= 50); a config already above it is left alone;
  ``PAPER``                  (optional) point label -> the paper's seed mIoU (%), for the tables.

The Ray driver (``cpal_ray.distributed.tune``) turns each list into ``tune.grid_search`` (or
``tune.choice`` for ``--search random``). ``expand`` gives the grid here, without Ray.
"""
from __future__ import annotations

import importlib
import itertools
from types import ModuleType
from typing import Any

# The space modules shipped in the ``tune_spaces`` package; a bare name means one of these.
SPACES_PACKAGE = "tune_spaces"
SPACES = ("k_tau", "table1", "table2", "table3", "bank", "table1_center", "photos", "photos_table1", "skeleton", "skeleton_variants", "skeleton_regions", "photos_skeleton", "photos_regions")
ROW_KEY = "row"


def load_space(module_path: str) -> ModuleType:
    """Import ``tune_spaces.k_tau`` (or just ``k_tau``) and check it is a valid space module."""
    name = module_path if "." in module_path else f"{SPACES_PACKAGE}.{module_path}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ValueError(f"{module_path}: no such space module (known: {', '.join(SPACES)})") from e
    check_space(module)
    return module


def check_space(module) -> dict:
    """Validate a space (module or any object with ``param_space()``); returns its space dict."""
    name = getattr(module, "__name__", repr(module))
    if not callable(getattr(module, "param_space", None)):
        raise ValueError(f"{name}: a space module must define param_space()")
    space = module.param_space()
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{name}: param_space() must return a non-empty dict")
    for key, values in space.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{name}: {key!r} must map to a non-empty list, got {values!r}")
        if key != ROW_KEY and key.count(".") != 1:
            raise ValueError(f"{name}: {key!r} is not a dotted config field (section.field) or 'row'")
    if ROW_KEY in space:
        rows = getattr(module, "ROWS", None) or {}
        missing = [label for label in space[ROW_KEY] if label not in rows]
        if missing:
            raise ValueError(f"{name}: row labels {missing} are not in ROWS")
    return space


def space_spec(module) -> dict[str, Any]:
    """Everything the driver needs from a space, as plain data (saved in the sweep's folder)."""
    space = check_space(module)
    doc = (getattr(module, "__doc__", None) or "").strip()
    return {"module": getattr(module, "__name__", "custom"), "title": doc.splitlines()[0] if doc else "",
            "space": space, "rows": dict(getattr(module, "ROWS", {}) or {}),
            "requires": dict(getattr(module, "REQUIRES", {}) or {}), "paper": dict(getattr(module, "PAPER", {}) or {})}


def expand(space: dict[str, list]) -> list[dict[str, Any]]:
    """The grid: every combination of the lists, in order (the last key varies fastest)."""
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def point_overrides(point: dict[str, Any], rows: dict[str, dict] | None = None) -> dict[str, Any]:
    """Dotted config overrides of one point: its fields, with ``row`` replaced by that row's dict."""
    out = {k: v for k, v in point.items() if k != ROW_KEY}
    if ROW_KEY in point:
        out.update((rows or {})[point[ROW_KEY]])
    return out


def point_label(point: dict[str, Any]) -> str:
    """Short name of a point: the row label, else ``key=value`` pairs."""
    if ROW_KEY in point:
        return str(point[ROW_KEY])
    return ", ".join(f"{k}={v}" for k, v in point.items())


def required_overrides(values: dict[str, Any], requires: dict[str, Any]) -> dict[str, Any]:
    """Overrides raising ``values`` (dotted field -> current value) to the space's lower bounds."""
    return {k: bound for k, bound in requires.items() if values.get(k) is None or values[k] < bound}


def smoke_space(space: dict[str, list]) -> dict[str, list]:
    """A 2-point version of a space for smoke runs: two values of the first key, one of the rest."""
    return {k: (v[:2] if i == 0 else v[:1]) for i, (k, v) in enumerate(space.items())}

