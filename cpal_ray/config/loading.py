"""The whole config (``Config``, one field per section), the settings a training run reads
(``StageTraining``), and how a config is built: YAML files, dotted overrides, old field names.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cpal_ray.config.rules import SHIPPED_CONFIGS, TASKS, _check, ConfigError
from cpal_ray.config.sections import (CPALConfig, DataConfig, DistConfig, FaultsConfig, ModelConfig,
                                      OptimConfig, TrainConfig)
from cpal_ray.config.stage_sections import AffinityConfig, InferenceConfig, PseudoLabelConfig, SegConfig

log = logging.getLogger(__name__)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that numbers in scientific notation without a dot
    (``1e6``, ``5e-4``) are floats, not strings."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cpal: CPALConfig = field(default_factory=CPALConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def __post_init__(self):
        t = self.training
        _check(t.batch_size % self.dist.num_workers == 0, t.field("batch_size"),
               f"global batch {t.batch_size} must be divisible by dist.num_workers={self.dist.num_workers}")
        _check(self.cpal.bank_shards <= self.bank_classes, "cpal.bank_shards",
               f"must be <= the bank's {self.bank_classes} classes (one class per shard at most), "
               f"got {self.cpal.bank_shards}")

    @property
    def bank_classes(self) -> int:
        """Rows of the support bank: the N foreground classes, and the background as row N when
        ``cpal.background = prototype``."""
        return self.data.num_classes + (self.cpal.background == "prototype")

    @property
    def training(self) -> "StageTraining":
        """What a training run of ``train.task`` trains with, each setting read from its one field:
        the CAM network's from ``train``/``optim``/``data``/``cpal``; a refine stage's from its own
        section (``affinity.epochs``, ``seg.lr``...), with the stage's fixed choices: no diagnostics,
        no bank, new layers at x1 (IRN trains only its new branch, the backbone frozen) or x10 (the
        segmenter's head, DeepLab's, whatever multiplier the CAM run used)."""
        task = self.train.task
        if task == "cam":
            return StageTraining(task, self.train.epochs, self.train.batch_size, self.optim.lr,
                                 self.optim.new_layer_lr_mult, self.data.crop_size, tuple(self.data.resize_long),
                                 self.train.diag_images, self.cpal.uses_bank)
        stage = self.affinity if task == "affinity" else self.seg
        return StageTraining(task, stage.epochs, stage.batch_size, stage.lr, 1.0 if task == "affinity" else 10.0,
                             stage.crop_size, tuple(stage.resize_long), 0, False)

    def for_task(self, task: str, name: str | None = None) -> "Config":
        """This config as the training run of ``task`` (``train.task`` set; the settings it trains
        with are then ``training``'s), named ``name``, else ``<train.name>-<task>`` (a name that
        already ends so is kept). ``task="cam"`` returns the config unchanged."""
        _check(task in TASKS, "train.task", f"must be one of {TASKS}, got {task!r}")
        if task == "cam":
            return self
        base = self.train.name
        return self.replace(**{"train.task": task,
                               "train.name": name or (base if base.endswith(f"-{task}") else f"{base}-{task}")})

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted keys changed, e.g. ``cfg.replace(**{"cpal.tau": 0.2})``."""
        return from_dict(_apply_overrides(self.to_dict(), dotted))


@dataclass(frozen=True)
class StageTraining:
    """The settings one training run trains with (``Config.training``)."""
    task: str
    epochs: int
    batch_size: int
    lr: float
    new_layer_lr_mult: float
    crop_size: int
    resize_long: tuple[int, int]
    diag_images: int
    uses_bank: bool

    def field(self, setting: str) -> str:
        """The dotted field a setting is read from: ``field("epochs")`` is ``train.epochs`` for the
        CAM run, ``affinity.epochs`` for the affinity stage."""
        return CAM_TRAINING_FIELDS[setting] if self.task == "cam" else f"{self.task}.{setting}"


# Where the CAM run reads each setting of ``StageTraining`` a refine stage reads from its own section.
CAM_TRAINING_FIELDS = {"epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr",
                       "crop_size": "data.crop_size", "resize_long": "data.resize_long"}
# The CAM run's settings a refine stage fixes itself.
CAM_ONLY_FIELDS = ("optim.new_layer_lr_mult", "train.diag_images", "cpal.enabled")


def check_stage_overrides(task: str, overrides: dict[str, Any]) -> None:
    """ConfigError for an override of a field the training run of ``task`` does not read (a refine
    stage trains from its own section): ``train.epochs`` for the affinity stage names ``affinity.epochs``."""
    if task == "cam":
        return
    for key in overrides:
        setting = next((s for s, f in CAM_TRAINING_FIELDS.items() if f == key), None)
        if setting is not None:
            _check(False, key, f"the {task} stage trains {task}.{setting}; set that")
        _check(key not in CAM_ONLY_FIELDS, key, f"the {task} stage does not read it (the CAM run's setting)")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Convert a YAML value to the field's declared type, or raise naming the field."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        args = typing.get_args(typ)
        _check(isinstance(value, (list, tuple)), name, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        _check(len(value) == len(args), name, f"must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if typ is bool:
        _check(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        return value
    if typ is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
        return value
    if typ is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, f"must be a number, got {value!r}")
        return float(value)
    if typ is str:
        _check(isinstance(value, str), name, f"must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    _check(isinstance(values, dict), prefix or "config", f"must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        _check(False, f"{prefix}{unknown[0]}", f"unknown field; {hint}known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        full = f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, full + ".")
        else:
            kwargs[name] = _coerce(value, typ, full)
    return cls(**kwargs)


# The Ray Data actors' resources before they had one shape: old dotted name -> new. A config
# (a user's YAML, a run's saved config.yaml, an override) that uses an old name still loads, with
# a warning naming both. inference.use_gpu / cam_actors_per_gpu became the GPU share of the CAM,
# mask and prediction actors (they all took 1 / cam_actors_per_gpu of a GPU with use_gpu).
RENAMED = {"inference.cam_cpus": "inference.actor_cpus", "inference.max_cam_actors": "inference.max_actors",
           "pseudo.cpus_per_task": "pseudo.actor_cpus", "pseudo.max_crf_actors": "pseudo.max_actors",
           "affinity.cpus_per_task": "affinity.actor_cpus", "seg.cpus_per_task": "seg.actor_cpus",
           "inference.use_gpu": "inference/affinity/seg.actor_gpus",
           "inference.cam_actors_per_gpu": "inference/affinity/seg.actor_gpus"}
GPU_SHARE_SECTIONS = ("inference", "affinity", "seg")
_RENAMES_TOLD: set[str] = set()  # the renames this process has warned about


def _tell_once(names: list[str], message: str) -> None:
    """Warn ``message`` unless this process has already warned about all of ``names``: every load
    of an older run's saved config.yaml (resume, a sweep's trials, each worker) would repeat it."""
    if set(names) - _RENAMES_TOLD:
        _RENAMES_TOLD.update(names)
        log.warning(message)


def _renamed(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the old names of ``RENAMED`` moved to the new ones (an old name wins over a
    new one given beside it: only an override or an old file still writes it)."""
    values = _to_plain(values)
    if not isinstance(values, dict):
        return values
    found = []
    for old, new in RENAMED.items():
        section, name = old.split(".")
        if isinstance(values.get(section), dict) and name in values[section]:
            found.append(f"{old} is now {new}")
            if not new.startswith(f"{section}/"):
                values[section][new.split(".")[1]] = values[section].pop(name)
    if found:
        _tell_once(found, f"config: {'; '.join(found)} (read as the new names here; rename them in your YAML or "
                          "overrides; a saved config.yaml of an older run needs nothing)")
    dist = values.get("dist")
    if isinstance(dist, dict) and any(k in dist for k in ("crash_rank", "crash_step", "crash_wait_s")):
        # dist.crash_* (test-only fault injection) became the faults section; a saved config of an
        # older run has them at their "off" values, which need no section at all.
        rank, step, wait = dist.pop("crash_rank", -1), dist.pop("crash_step", -1), dist.pop("crash_wait_s", 0.0)
        if rank != -1 and step != -1:
            _tell_once(["dist.crash_*"], "config: dist.crash_* is now the faults section (read as it here; rename it)")
            values["faults"] = {"target": "bank" if rank == -2 else "worker", "kill_rank": max(rank, 0),
                                "at_step": step, "wait_s": wait}
    inference = values.get("inference")
    if isinstance(inference, dict) and ("use_gpu" in inference or "cam_actors_per_gpu" in inference):
        on = inference.pop("use_gpu", None)
        per_gpu = inference.pop("cam_actors_per_gpu", None)
        _check(on is None or isinstance(on, bool), "inference.use_gpu", f"must be true or false, got {on!r}")
        _check(per_gpu is None or (isinstance(per_gpu, int) and not isinstance(per_gpu, bool) and per_gpu >= 1),
               "inference.cam_actors_per_gpu", f"must be an integer >= 1, got {per_gpu!r}")
        current = inference.get("actor_gpus", 0.0)
        on = bool(current) if on is None else on
        share = 1.0 / per_gpu if per_gpu is not None else (current or 1.0)
        for section in GPU_SHARE_SECTIONS:
            values.setdefault(section, {})
            if isinstance(values[section], dict):
                values[section]["actor_gpus"] = share if on else 0.0
    return values


def from_dict(values: dict[str, Any]) -> Config:
    """Build a validated Config from a nested dict (missing fields take defaults; the old names
    of ``RENAMED`` are read as the new ones, with a warning)."""
    return _build(Config, _renamed(values or {}), "")


def _apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = _to_plain(values)
    for key, value in overrides.items():
        parts = key.split(".")
        _check(len(parts) == 2, key, "overrides take the form section.field=value")
        out.setdefault(parts[0], {})
        _check(isinstance(out[parts[0]], dict), parts[0], "must be a mapping")
        out[parts[0]][parts[1]] = value
    return out


def _field_type(key: str) -> Any:
    """The declared type of a dotted field (``train.name`` -> str); None for an unknown one."""
    section, _, name = key.partition(".")
    cls = typing.get_type_hints(Config).get(section)
    return typing.get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["cpal.tau=0.2", "model.backbone=tiny"]`` -> {"cpal.tau": 0.2, ...} (values parsed as YAML).

    A text field stays the text typed: ``train.name=001`` is "001", ``train.name=yes`` is "yes"
    (YAML alone would make them 1 and True)."""
    parsed = {}
    for item in items:
        _check("=" in item, item, "an override must look like section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            if _field_type(key) is not str:
                raise ConfigError(f"override {item}: not a YAML value ({str(e).splitlines()[0]})", field=key) from None
            value = raw.strip()
        if _field_type(key) is str and value is not None and not isinstance(value, (str, list, dict)):
            value = raw.strip()
        parsed[key] = value
    return parsed


def _override_of(field: str, overrides: dict[str, Any]) -> str | None:
    """The override that set ``field`` or a field below it (an unknown section: ``cpall.tau``)."""
    return field if field in overrides else next((k for k in overrides if k.startswith(f"{field}.")), None)


def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package (``cpal_ray/configs/<name>.yaml``)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def config_file(path):
    """The ``Location`` of a config: ``path`` itself when it exists (a local path or a URI), else
    the shipped config it names — ``configs/<name>.yaml``, ``<name>.yaml`` or ``<name>`` — found in
    the installed package, so a shipped config loads from any directory."""
    from cpal_ray.storage import is_uri, location

    loc = location(path)
    if loc.is_file():
        return loc
    text = str(path)
    if not is_uri(text) and Path(text).parent in (Path("."), Path("configs")):
        shipped = SHIPPED_CONFIGS / (Path(text).stem + ".yaml")
        if shipped.is_file():
            return location(shipped)
    raise ConfigError(f"{text}: config file not found (shipped configs: {', '.join(shipped_configs())})")


def load_config(path=None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load YAML (or defaults when ``path`` is None), apply dotted overrides, validate.

    path: a local path, a URI (``s3://…/config.yaml``), a ``cpal_ray.storage.Location`` or a
    shipped config's name (``config_file``). An invalid value raises ``ConfigError`` naming the
    field and where it came from: the override that set it, else the file.
    """
    values: dict[str, Any] = {}
    source = None
    if path is not None:
        source = config_file(path)
        try:
            values = _yaml(source.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    try:
        cfg = from_dict(_apply_overrides(values, overrides))
        check_stage_overrides(cfg.train.task, overrides)
        return cfg
    except ConfigError as e:
        if (key := _override_of(e.field, overrides)) is not None:
            raise ConfigError(f"override {key}={overrides[key]}: {e}", e.field) from None
        raise ConfigError(f"{source}: {e}" if source is not None else str(e), e.field) from None


def config_yaml(cfg: Config) -> str:
    """The YAML text ``save_config`` writes."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path):
    """Write the resolved config as YAML to a local path or URI (atomically); returns its Location."""
    from cpal_ray.storage import location

    return location(path).write_text(config_yaml(cfg))
