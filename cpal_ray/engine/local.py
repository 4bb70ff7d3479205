"""Train in one process (no Ray): the reference the distributed run is checked against.

Per epoch: cluster the bank into context prototypes (Eq. 5) at the start of the epoch (the
paper's schedule; epoch 0 starts empty, see ``cpal_ray.cpal.loss`` on the cold start), then
``train_one_epoch``. The bank here is an in-process ``PrototypeBank``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cpal_ray.config import Config
from cpal_ray.cpal import PrototypeBank
from cpal_ray.engine.checkpoint import save_checkpoint
from cpal_ray.engine.loop import Context, train_one_epoch
from cpal_ray.engine.optim import build_optimizer, poly_scheduler, steps_per_epoch
from cpal_ray.engine.sampler import GlobalBatchSampler

log = logging.getLogger(__name__)


def build_bank(cfg: Config, model) -> PrototypeBank | None:
    """The support bank for this config (None for the BCE baseline)."""
    if not cfg.cpal.enabled:
        return None
    return PrototypeBank.from_config(cfg.cpal, cfg.data.num_classes, model.embed_dim)


def cluster_context(bank: PrototypeBank | None, tag: str) -> Context | None:
    """Cluster the bank (once per tag) and return the context, or None while it is empty."""
    if bank is None or bank.counts().sum() == 0:
        return None
    ctx, counts, version = bank.cluster(tag)
    return Context.from_numpy(ctx, counts, version)


def warmup_hook(cfg: Config, epoch: int, cluster):
    """on_step hook for the optional warm start: cluster once after step s of epoch 0."""
    s = cfg.cpal.warmup_cluster_steps
    if not cfg.cpal.enabled or s <= 0 or epoch != 0:
        return None
    return lambda step, done: cluster("warmup") if done == s else None


def fit_local(cfg: Config, out_dir: str | Path | None = None, device: str = "cpu", model=None, dataset=None) -> dict:
    """Train ``cfg.train.epochs`` epochs in this process; returns model, bank, context, history."""
    from cpal_ray.data import build_dataset
    from cpal_ray.models import build_model

    torch.manual_seed(cfg.train.seed)
    dataset = dataset if dataset is not None else build_dataset(cfg.data, "train", train=True)
    model = model if model is not None else build_model(cfg.model, cfg.data.num_classes)
    model.to(device)
    n_steps = steps_per_epoch(len(dataset), cfg.train.batch_size, cfg.train.max_steps_per_epoch)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = poly_scheduler(optimizer, n_steps * cfg.train.epochs, cfg.optim.poly_power)
    bank = build_bank(cfg, model)
    context, history = None, []
    for epoch in range(cfg.train.epochs):
        context = cluster_context(bank, f"epoch{epoch}") or context
        sampler = GlobalBatchSampler(len(dataset), cfg.train.batch_size, seed=cfg.train.seed, max_steps=n_steps)
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.loader_workers)
        hook = warmup_hook(cfg, epoch, lambda tag: cluster_context(bank, tag))
        stats = train_one_epoch(model, loader, optimizer, scheduler, cfg, epoch=epoch, device=device, bank=bank,
                                context=context, max_steps=n_steps, on_step=hook)
        stats["epoch"] = epoch
        if bank is not None:
            stats.update(bank.stats())
        history.append(stats)
        log.info("epoch %d: %s", epoch, {k: v for k, v in stats.items() if isinstance(v, float)})
        if out_dir is not None:
            save_checkpoint(Path(out_dir) / f"epoch_{epoch:03d}", model=model, optimizer=optimizer,
                            scheduler=scheduler, epoch=epoch + 1, global_step=(epoch + 1) * n_steps, cfg=cfg,
                            bank_state=bank.state_dict() if bank else None,
                            context=_context_dict(bank))
    # The prototypes used for inference (PACAM): a clustering of the final bank.
    final_ctx = cluster_context(bank, f"epoch{cfg.train.epochs}")
    return {"model": model, "bank": bank, "context": final_ctx, "history": history}


def _context_dict(bank: PrototypeBank | None) -> dict | None:
    if bank is None:
        return None
    ctx, counts, version = bank.context_tensors()
    return {"prototypes": ctx, "counts": counts, "version": version}
