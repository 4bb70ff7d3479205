"""The config's vocabulary and validation: the allowed values of its choice fields, ``ConfigError``
and the rules every section checks on construction (``_validate``), and the run-name rule.
"""
from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

DATASETS = ("voc", "coco", "synthetic", "attributes")
METRICS = ("dot", "l1", "l2", "cosine")
CAM_SOURCES = ("cam", "pacam")
CENTERS = ("none", "image")
# The pixel embedding z of Eqs. 4 and 13 (model.embedding): an MLP head on the last stage, or
# SIPE's hierarchical feature (side convs on every detached backbone stage).
EMBEDDINGS = ("head", "hierarchical")
# The PACAM's background channel (cpal.background): 1 - max of the foreground PACAM, or the
# cosine map of a background prototype (the background is class N of the bank).
BACKGROUNDS = ("one_minus_max", "prototype")
# Where the PACAM's prototypes come from (cpal.context): the bank's context prototypes (CPAL) or
# each image's own instance prototypes (SIPE's IS-CAM; no bank).
CONTEXTS = ("bank", "instance")
# The region an instance prototype averages over (cpal.region): M_n > tau (Eq. 4) or SIPE's seeds.
REGIONS = ("threshold", "sipe")
# Which map L_self moves (cpal.self_grad): both, the CAM only (PACAM a target), the PACAM only.
SELF_GRADS = ("both", "cam", "pacam")
PSEUDO_MODES = ("irn", "crf_argmax")
# What a training run trains (train.task): the CAM network (CPAL or the BCE baseline), IRN's
# boundary network for the affinities (refine stage 1), or the segmentation network (stage 2).
TASKS = ("cam", "affinity", "seg")
WALK_MODES = ("average", "mass")
# Named (conf_fg, conf_bg) presets for IRN-style pseudo-labels.
PSEUDO_PRESETS = {"irn": (0.30, 0.05), "amn": (0.45, 0.15)}
# The configs shipped inside the package (configs/<name>.yaml names them from anywhere).
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The data shipped inside the package (real photos, see cpal_ray/assets/voc_mini/PROVENANCE.md).
BUNDLED_VOC_MINI = "bundled:voc-mini"


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (and the file or the override it
    came from); ``field`` is the dotted field name."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}", field=name)


# A rule of a section's validation: (field, test of its value, what the error says; "{v}" = the value).
Rule = tuple[str, typing.Callable[[Any], bool], str]


def _validate(section: str, obj: Any, *rules: Rule) -> None:
    """Check ``rules`` on the fields of ``obj`` in order; the first that fails raises ConfigError
    naming ``section.field``."""
    for name, test, message in rules:
        value = getattr(obj, name)
        _check(test(value), f"{section}.{name}", message.format(v=value))


def _at_least(name: str, low: float, note: str = "") -> Rule:
    return name, lambda v: v >= low, f"must be >= {low}{note}"


def _positive(name: str, note: str = "") -> Rule:
    return name, lambda v: v > 0, f"must be > 0{note}"


def _one_of(name: str, choices: tuple, note: str = "") -> Rule:
    return name, lambda v: v in choices, f"must be one of {choices}{note}"


def _long_side_range(name: str = "resize_long") -> Rule:
    return (name, lambda v: len(v) == 2 and 0 < v[0] <= v[1],
            "must be (min, max) with 0 < min <= max, got {v}")


def _scales(name: str = "scales") -> Rule:
    return (name, lambda v: len(v) >= 1 and all(s > 0 for s in v),
            "must be a non-empty list of positive numbers, got {v}")


# A run name is one safe path component: it cannot leave its storage folder ("..", "/") or hide.
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,199}")


def check_run_name(name: str, field: str = "train.name") -> str:
    """``name`` when it is one safe folder name (letters, digits, ``_ . + = -``, not starting with
    a dot); ConfigError naming ``field`` otherwise."""
    _check(isinstance(name, str) and _RUN_NAME.fullmatch(name) is not None, field,
           f"must be one folder name (letters, digits, _ . + = -, not starting with '.'), got {name!r}")
    return name
