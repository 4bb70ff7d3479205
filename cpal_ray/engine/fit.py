"""``fit``: the one training loop of cpal-ray, for one process and for every Ray Train worker, and
for each network ``train.task`` names (the CAM network, IRN's affinity network, the segmenter).

    fit_local(cfg)      = fit(cfg, hooks=task_hooks(cfg), save_fn=<write epoch_NNN/>)
    Ray Train worker    = fit(cfg, hooks=task_hooks(cfg, <its Ray client>) + NodeHook…,
                              prepare_model=ray.train.torch.prepare_model, save_fn=<ray.train.report>)

``fit`` knows the model, the optimiser, the schedule and the data; what a task needs beyond its
step (CPAL's, for the CAM network: ``engine.cpal_hooks``) comes in as hooks (``engine.tasks.task_hooks``),
which share what they provide through ``state.extras``. Hooks run sorted by ``priority``
(``engine.hooks``; detectron2's and mmengine's pattern, without the framework)::

    resume (model, optimizer, scheduler, epoch)
    hook.before_train(state, resume)          every hook restores (or resets) what it keeps
    for epoch in range(start, cfg.training.epochs):
        hook.before_epoch(state)
        for step, batch in loader:            train_one_epoch: one SGD step
            hook.after_step(state, step, outputs)
        hook.after_epoch(state, record)       PROVIDE (CPAL's clustering for the next epoch), MEASURE
                                              (diagnostics), NORMAL (the caller's), RECORD (run
                                              records), LAST (the checkpoint, after every hook's
                                              before_save_checkpoint)
        state.history.append(record)

So the checkpoint of epoch e holds what its next epoch (and inference) uses, whichever path wrote it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import DataLoader

from cpal_ray.config import Config
from cpal_ray.data import SkipUnreadable, build_train_dataset, record_labels_source
from cpal_ray.engine.checkpoint import CheckpointError
from cpal_ray.engine.comm import all_gather_object
from cpal_ray.engine.hooks import CheckpointHook, Hook, by_priority
from cpal_ray.engine.loop import train_one_epoch
from cpal_ray.engine.optim import build_optimizer, build_scheduler
from cpal_ray.engine.resume import check_resume, resume_schedule
from cpal_ray.engine.sampler import GlobalBatchSampler
from cpal_ray.engine.tasks import CHECKPOINT_SECTIONS
from cpal_ray.engine.tracking import TrackingHook
from cpal_ray.models import build_task_model, unwrap

log = logging.getLogger(__name__)
MAX_LISTED_SKIPS = 20  # skipped ids listed in an epoch's record (the count is always complete)


@dataclass
class TrainState:
    """What the loop and its hooks share. ``model`` may be DDP-wrapped (``unwrap`` it to save)."""
    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device | str
    rank: int
    world_size: int
    steps_per_epoch: int
    epoch: int = 0
    history: list = field(default_factory=list)
    logged: dict | None = None  # the loss terms and lr of a train.log_every step (train_one_epoch)
    extras: dict = field(default_factory=dict)  # what the task's hooks provide (its step reads them)

    @property
    def global_step(self) -> int:
        """Steps completed when the current epoch ends."""
        return (self.epoch + 1) * self.steps_per_epoch


@dataclass
class FitResult:
    """What ``fit`` hands back. ``extras`` (the task's hooks' ``state.extras``) read as attributes
    too: a CAM run's ``result.context`` (what inference's PACAM uses) and its store of them."""
    model: torch.nn.Module      # unwrapped, on its training device
    history: list               # one record per epoch trained by this call
    extras: dict = field(default_factory=dict)

    def __getattr__(self, name: str):
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(f"{type(self).__name__} has no {name!r} (extras: {sorted(extras)})")


def fit(cfg: Config, *, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
        prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        save_fn: Callable[[dict | None, dict], None] | None = None, resume: dict | None = None,
        hooks: list[Hook] = (), model: torch.nn.Module | None = None, dataset=None, run_dir=None) -> FitResult:
    """Train ``cfg.training.epochs`` epochs (from ``resume["epoch"]`` when resuming).

    device: where the model trains; rank / world_size: this worker's shard of every global batch
    (``GlobalBatchSampler``); prepare_model: wraps the model for data parallelism (default:
    ``model.to(device)``); save_fn: receives each epoch's checkpoint (see ``CheckpointHook``);
    resume: a loaded checkpoint (``load_checkpoint``), whose config is compared with ``cfg`` first
    (``engine.resume``: a frozen field that differs is a ConfigError) and whose lr schedule is
    spread over ``cfg.training.epochs``; hooks: the task's (``engine.tasks.task_hooks``) and the
    caller's, run by priority; model / dataset: built from ``cfg`` (seeded with ``train.seed``)
    when not given; run_dir: where the run's records go as it trains (``TrackingHook``:
    TensorBoard, history.json, curves.png).
    """
    torch.manual_seed(cfg.train.seed)
    dataset = dataset if dataset is not None else build_train_dataset(cfg)
    cfg = dataclasses.replace(cfg, data=record_labels_source(cfg.data, dataset))  # checkpoints name the labels used
    if cfg.data.on_bad_sample == "skip":
        dataset = SkipUnreadable(dataset)
    model = model if model is not None else build_task_model(cfg)
    sampler = GlobalBatchSampler(len(dataset), cfg.training.batch_size, world_size, rank, seed=cfg.train.seed,
                                 max_steps=cfg.train.max_steps_per_epoch)
    # Not persistent: loader workers must see dataset.set_epoch() (the augmentation stream).
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.loader_workers)
    optimizer = build_optimizer(model, cfg.optim, cfg.training.lr, cfg.training.new_layer_lr_mult)
    scheduler = build_scheduler(optimizer, len(sampler) * cfg.training.epochs, cfg.optim.poly_power)
    start_epoch = 0
    if resume is not None:
        changes = check_resume(resume["config"], cfg, f"resuming {cfg.train.name}")
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as e:  # frozen fields equal, weights not: a checkpoint of another network
            raise CheckpointError(f"resuming {cfg.train.name}: the checkpoint's weights do not fit the "
                                  f"{cfg.model.backbone} network ({str(e).splitlines()[0]})") from None
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        resume_schedule(scheduler, len(sampler) * cfg.training.epochs, cfg.optim.poly_power)
        start_epoch = int(resume["epoch"])
        if rank == 0:
            log.info("resuming %s from epoch %d of %d; changed: %s", cfg.train.name, start_epoch, cfg.training.epochs,
                     ", ".join(changes) or "nothing")
    model = prepare_model(model) if prepare_model is not None else model.to(device)
    state = TrainState(cfg, model, optimizer, scheduler, device, rank, world_size, len(sampler), epoch=start_epoch)
    all_hooks = [*hooks, *([TrackingHook(run_dir, cfg.train.name)] if run_dir is not None else [])]
    if save_fn is not None:
        all_hooks.append(CheckpointHook(save_fn, all_hooks, CHECKPOINT_SECTIONS))
    all_hooks[:] = by_priority(all_hooks)  # in place: the CheckpointHook asks them all, in this order
    for hook in all_hooks:
        hook.before_train(state, resume)
    for epoch in range(start_epoch, cfg.training.epochs):
        state.epoch = epoch
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        for hook in all_hooks:
            hook.before_epoch(state)
        record = train_one_epoch(state, loader, all_hooks)
        record["epoch"] = epoch
        record["start_epoch"] = start_epoch  # > 0: this attempt resumed from a checkpoint
        skipped = sorted(set().union(*all_gather_object(record.pop("skipped_ids"))))
        record["skipped_samples"], record["skipped_ids"] = len(skipped), skipped[:MAX_LISTED_SKIPS]
        if skipped and rank == 0:
            log.warning("epoch %d: %d unreadable samples replaced by readable ones (data.on_bad_sample=skip): %s",
                        epoch, len(skipped), skipped[:MAX_LISTED_SKIPS])
        for hook in all_hooks:
            hook.after_epoch(state, record)
        state.history.append(record)
        if rank == 0:  # one short line (history.json and TensorBoard have every number)
            log.info("epoch %d done: %s", epoch, " ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                          if k in ("loss", "bce", "self", "step_seconds"))[:160])
    return FitResult(model=unwrap(state.model), history=state.history, extras=state.extras)
