"""What a resumed run may change, and the schedule it then follows.

A run resumes from its checkpoint when it is started again under the same name (Ray) or into the
same folder (``fit_local``). Its config is compared with the one saved with the checkpoint:

  frozen       the network, the data and how it is sampled, the CPAL maths, the optimiser, the
               seed (``data.*``, ``model.*``, ``cpal.*``, ``optim.*``, ``train.seed``,
               ``train.batch_size``, ``train.max_steps_per_epoch``, ``train.task`` and the stage
               fields a refine network is built or trained from): a change is refused with one
               line naming each field, before anything is trained;
  may change   everything else: ``train.epochs`` (the poly schedule is then spread over the new
               total), logging, checkpoints kept, ``dist.*`` (workers, resources, retries),
               ``inference.*``, ``data.loader_workers`` / ``on_bad_sample`` / ``val_split`` /
               ``mask_dir``. The changes are logged:
               ``resuming <name> from epoch k of n; changed: train.epochs 2 -> 6``.
"""
from __future__ import annotations

from typing import Any

from cpal_ray.config import Config, ConfigError

FROZEN_SECTIONS = ("data", "model", "cpal", "optim")
MAY_CHANGE = {"data.loader_workers", "data.on_bad_sample", "data.val_split", "data.mask_dir"}
FROZEN_FIELDS = {"train.seed", "train.batch_size", "train.max_steps_per_epoch", "train.task"}
# Fields of the stage sections a refine network is built or trained from (its epochs may change).
_STAGE_TRAINING = ("batch_size", "lr", "crop_size", "resize_long")
FROZEN_STAGE_FIELDS = {"affinity": {"affinity.seeds_dir", "affinity.radius", *(f"affinity.{f}" for f in _STAGE_TRAINING)},
                       "seg": {"seg.masks_dir", "seg.head", "seg.backbone", "seg.weights",
                               *(f"seg.{f}" for f in _STAGE_TRAINING)}}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(dotted field, saved value, new value) of every field that differs, sorted by field."""
    old, now = _flat(saved.to_dict()), _flat(new.to_dict())
    return [(k, old.get(k), now.get(k)) for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]


def is_frozen(field: str, task: str) -> bool:
    """True for a field a run cannot change when it resumes (the module docstring)."""
    if field in MAY_CHANGE:
        return False
    return (field.split(".")[0] in FROZEN_SECTIONS or field in FROZEN_FIELDS
            or field in FROZEN_STAGE_FIELDS.get(task, ()))


def check_resume(saved: Config, new: Config, where: str) -> list[str]:
    """The changes of ``new`` over the ``saved`` config of the run at ``where``, as
    ``"train.epochs 2 -> 6"``; ConfigError naming every frozen field that differs."""
    changes = config_changes(saved, new)
    frozen = [f"{k} ({a!r} -> {b!r})" for k, a, b in changes if is_frozen(k, saved.train.task)]
    if frozen:
        raise ConfigError(f"{where}: cannot resume with a different {', '.join(frozen)}: these cannot change "
                          f"mid-run; start a new run (another train.name) or resume with the saved config")
    return [f"{k} {a} -> {b}" for k, a, b in changes]


def resume_schedule(scheduler, total_steps: int, power: float) -> None:
    """After ``scheduler.load_state_dict``: the poly schedule over ``total_steps`` (the saved state
    holds the old total, and a finished run's lr of 0), at the step the saved state reached: each
    group's lr = its initial lr * (1 - step / total) ** power, what a fresh run over
    ``total_steps`` has at that step."""
    total = max(1, int(total_steps))
    scheduler.total_iters = total
    step = min(scheduler.last_epoch, total)
    lrs = [base * (1.0 - step / total) ** power for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
