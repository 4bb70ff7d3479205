"""The Ray Train worker loop: plain ``train_one_epoch`` plus the few Ray calls, numbered.

Per epoch every rank: trains on its shard (pushing prototypes to the bank actor), flushes its
pushes, meets the others at a barrier, asks the actor for the clustering of the next epoch
(the actor runs it once per tag; everyone gets the same version), then reports. Rank 0 also
writes the checkpoint: model, optimizer, scheduler, epoch, config, bank state and context.
On (re)start, rank 0 loads the checkpoint's bank state into the actor (or empties it), so a
restarted run continues from exactly the saved bank.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cpal_ray.config import from_dict
from cpal_ray.distributed.bank import NAMESPACE, BankClient
from cpal_ray.engine import (Context, build_optimizer, context_from_state, load_checkpoint, poly_scheduler,
                             save_checkpoint, train_one_epoch, warmup_hook)
from cpal_ray.engine.sampler import GlobalBatchSampler

log = logging.getLogger(__name__)


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _fault_marker(cfg, kind: str) -> Path:
    return Path(cfg.train.storage_path).expanduser().resolve() / cfg.train.name / f".fault_{kind}_done"


def make_fault_hook(cfg, rank: int, epoch: int, steps_per_epoch: int, bank_actor):
    """Fault injection for tests, once per run (a marker file in the run folder remembers):
    ``dist.crash_rank/crash_step`` kills that worker process at that global step;
    ``crash_rank = -2`` kills the bank actor instead (from rank 0)."""
    d = cfg.dist
    if d.crash_step < 0:
        return None

    def hook(step: int, done: int):
        if epoch * steps_per_epoch + step != d.crash_step:
            return None
        target_rank = 0 if d.crash_rank == -2 else d.crash_rank
        if rank != target_rank:
            return None
        marker = _fault_marker(cfg, "bank" if d.crash_rank == -2 else "worker")
        if marker.exists():
            return None
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"epoch {epoch} step {step}\n")
        if d.crash_rank == -2:
            log.warning("fault injection: killing the bank actor at global step %d", d.crash_step)
            ray.kill(bank_actor, no_restart=False)
            return None
        log.warning("fault injection: killing rank %d at global step %d", rank, d.crash_step)
        os._exit(1)

    return hook


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(config["cfg"])
    from cpal_ray.data import build_dataset
    from cpal_ray.models import build_model

    ctx = ray.train.get_context()  # (1) who am I
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    dataset = build_dataset(cfg.data, "train", train=True)
    sampler = GlobalBatchSampler(len(dataset), cfg.train.batch_size, world, rank, seed=cfg.train.seed,
                                 max_steps=cfg.train.max_steps_per_epoch)
    # Not persistent: loader workers must see dataset.set_epoch() (the augmentation stream).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.loader_workers)
    n_steps = len(sampler)
    model = build_model(cfg.model, cfg.data.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = poly_scheduler(optimizer, n_steps * cfg.train.epochs, cfg.optim.poly_power)

    actor = ray.get_actor(config["bank_actor"], namespace=NAMESPACE) if config.get("bank_actor") else None
    client = BankClient(actor, cfg.dist.max_pushes_in_flight) if actor is not None else None

    start_epoch, context = 0, None
    checkpoint = ray.train.get_checkpoint()  # (2) resume from the last reported checkpoint
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
        context = context_from_state(state)
    if actor is not None and rank == 0:
        ray.get(actor.load_state_dict.remote(state["bank"] if state else None))
    model = ray.train.torch.prepare_model(model)  # (3) DDP (gloo on CPU, nccl on GPU), moved to device
    _barrier()

    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        cluster = (lambda tag: _cluster_all_ranks(client, tag)) if client is not None else None
        hooks = [h for h in (warmup_hook(cfg, epoch, cluster) if cluster else None,
                             make_fault_hook(cfg, rank, epoch, n_steps, actor)) if h]
        stats = train_one_epoch(model, loader, optimizer, scheduler, cfg, epoch=epoch, device=device, bank=client,
                                context=context, rank=rank, max_steps=n_steps, on_step=_chain(hooks))
        if client is not None:  # clustering for the next epoch: run once by the actor, same version for all
            context = _cluster_all_ranks(client, f"epoch{epoch + 1}")
        else:
            _barrier()
        versions = _gather(context.version if context else 0)
        pushed = _gather(stats["pushed"])
        metrics = {k: stats[k] for k in ("loss", "bce", "self", "steps", "images", "self_images",
                                         "data_seconds", "step_seconds")}
        metrics.update(epoch=epoch, context_versions=versions, pushed_per_rank=[{str(k): v for k, v in p.items()} for p in pushed],
                       bank_bytes_per_step=(client.bytes_sent / max(client.pushes, 1)) if client else 0.0)
        if actor is not None:
            bstats = ray.get(actor.stats.remote())
            metrics.update(bank_fill=bstats["bank_fill"], cluster_seconds=bstats["cluster_seconds"],
                           cluster_device=bstats["cluster_device"], bank_keys=bstats["bank_keys"])
        if rank == 0:
            bank_state = ray.get(actor.state_dict.remote()) if actor is not None else None
            ctx_dict = ({"prototypes": context.prototypes, "counts": context.counts, "version": context.version}
                        if context else None)
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1,
                                global_step=(epoch + 1) * n_steps, cfg=cfg, bank_state=bank_state, context=ctx_dict,
                                metrics=metrics)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # (4) report
        else:
            ray.train.report(metrics)


def _chain(hooks):
    if not hooks:
        return None

    def run(step, done):
        result = None
        for h in hooks:
            r = h(step, done)
            result = r if r is not None else result
        return result

    return run


def _cluster_all_ranks(client: BankClient, tag: str) -> Context | None:
    """Every rank: land its own pushes, meet the others, then ask the actor for the clustering
    of ``tag`` (run once, by the first caller). None while the bank is still empty."""
    client.flush()
    _barrier()
    arr, counts, version = client.cluster(tag)
    return Context.from_numpy(arr, counts, version) if counts.sum() > 0 else None
