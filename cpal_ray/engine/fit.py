"""``fit``: the one training loop of cpal-ray, for one process and for every Ray Train worker, and
for each network ``train.task`` names (the CAM network, IRN's affinity network, the segmenter).

    fit_local(cfg)      = fit(cfg, bank=PrototypeBank, save_fn=<write epoch_NNN/>)
    Ray Train worker    = fit(cfg, bank=BankClient, prepare_model=ray.train.torch.prepare_model,
                              save_fn=<ray.train.report>)

The bank is anything with the interface of ``cpal_ray.cpal.bank`` (``push``, ``cluster(tag)``,
``state_dict``, ``load_state_dict``, ``stats``). Work around the epochs is done by hooks, called
in this order (detectron2's pattern, without the framework)::

    resume (model, optimizer, scheduler, epoch, bank with its context) or empty the bank
    for epoch in range(start, cfg.training.epochs):
        hook.before_epoch(state)              for every hook
        for step, batch in loader:            train_one_epoch
            …one SGD step, push prototypes…
            hook.after_step(state, step)      ClusterHook (warm-up), FaultHook (tests)
        hook.after_epoch(state, record)       ClusterHook (k-means for the next epoch), DiagnosticsHook
                                              (what CPAL did), the caller's hooks, TrackingHook (records
                                              in the run folder), CheckpointHook last
        state.history.append(record)

Clustering: the context prototypes of epoch e+1 are clustered from the bank at the end of epoch
e (tag ``epoch<e+1>``) — the paper's "once at the beginning of each epoch", run before the
checkpoint so that the checkpoint of epoch e holds the context its next epoch (and inference)
uses, whichever path wrote it. Epoch 0 starts without context (BCE only) unless
``cpal.warmup_cluster_steps`` clusters early.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import DataLoader

from cpal_ray.config import Config
from cpal_ray.cpal.bank import Context
from cpal_ray.engine.checkpoint import CheckpointError
from cpal_ray.engine.comm import all_gather_object
from cpal_ray.engine.diagnostics import DiagnosticsHook
from cpal_ray.engine.hooks import CheckpointHook, ClusterHook, Hook
from cpal_ray.engine.loop import train_one_epoch
from cpal_ray.engine.optim import build_optimizer, build_scheduler
from cpal_ray.engine.resume import check_resume, resume_schedule
from cpal_ray.engine.sampler import GlobalBatchSampler
from cpal_ray.engine.tracking import TrackingHook

log = logging.getLogger(__name__)
MAX_LISTED_SKIPS = 20  # skipped ids listed in an epoch's record (the count is always complete)


@dataclass
class TrainState:
    """What the loop and its hooks share. ``model`` may be DDP-wrapped (``unwrap`` it to save)."""
    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    bank: object | None
    context: Context | None
    device: torch.device | str
    rank: int
    world_size: int
    steps_per_epoch: int
    epoch: int = 0
    history: list = field(default_factory=list)
    logged: dict | None = None  # the loss terms and lr of a train.log_every step (train_one_epoch)

    @property
    def global_step(self) -> int:
        """Steps completed when the current epoch ends."""
        return (self.epoch + 1) * self.steps_per_epoch


@dataclass
class FitResult:
    model: torch.nn.Module      # unwrapped, on its training device
    bank: object | None
    context: Context | None     # the last clustering: what inference (PACAM) uses
    history: list               # one record per epoch trained by this call


def fit(cfg: Config, *, bank=None, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
        prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        save_fn: Callable[[dict | None, dict], None] | None = None, resume: dict | None = None,
        hooks: list[Hook] = (), model: torch.nn.Module | None = None, dataset=None, run_dir=None) -> FitResult:
    """Train ``cfg.training.epochs`` epochs (from ``resume["epoch"]`` when resuming).

    bank: the bank interface (None for the BCE baseline); device: where the model trains;
    rank / world_size: this worker's shard of every global batch (``GlobalBatchSampler``);
    prepare_model: wraps the model for data parallelism (default: ``model.to(device)``);
    save_fn: receives each epoch's checkpoint (see ``CheckpointHook``); resume: a loaded
    checkpoint (``load_checkpoint``), whose config is compared with ``cfg`` first
    (``engine.resume``: a frozen field that differs is a ConfigError) and whose lr schedule is
    spread over ``cfg.training.epochs``; hooks: run after the clustering, before the checkpoint;
    model / dataset: built from ``cfg`` (seeded with ``train.seed``) when not given; run_dir: where
    the run's records go as it trains (``TrackingHook``: TensorBoard, history.json, curves.png).
    """
    from cpal_ray.data import SkipUnreadable, build_train_dataset, record_labels_source
    from cpal_ray.models import build_task_model, unwrap

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
    start_epoch, context = 0, None
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
    if bank is not None:  # the bank always equals the state saved with the model
        bank_state = resume["bank"] if resume is not None else None
        bank.load_state_dict(bank_state)
        context = Context.from_state(bank_state["context"]) if bank_state else None
        # What this attempt starts from, in its first epoch's record: a test (and a person reading a
        # resumed run's history) sees that the bank came back, not only that its keys are unique.
        restored = bank.stats()
        bank_at_start = {"bank_keys": restored["bank_keys"], "bank_entries": int(sum(restored["bank_pushed"])),
                         "context_version": restored["context_version"]}
    model = prepare_model(model) if prepare_model is not None else model.to(device)
    state = TrainState(cfg, model, optimizer, scheduler, bank, context, device, rank, world_size, len(sampler),
                       epoch=start_epoch)
    all_hooks = [*([ClusterHook(cfg.cpal.warmup_cluster_steps)] if bank is not None else []),
                 *([DiagnosticsHook(cfg, cfg.training.diag_images)] if cfg.train.task == "cam" else []), *hooks,
                 *([TrackingHook(run_dir, cfg.train.name)] if run_dir is not None else []),
                 *([CheckpointHook(save_fn)] if save_fn is not None else [])]
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
        if bank is not None and epoch == start_epoch:
            record["bank_at_start"] = bank_at_start
        record["pushed_per_rank"] = [{str(k): v for k, v in p.items()} for p in all_gather_object(record.pop("pushed"))]
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
    return FitResult(model=unwrap(state.model), bank=bank, context=state.context, history=state.history)
