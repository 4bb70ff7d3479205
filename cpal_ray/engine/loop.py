"""Single-process training and seed evaluation: plain PyTorch, no Ray.

``train_one_epoch`` is what each Ray Train worker runs (``cpal_ray.distributed``); the worker
only wraps the model with DDP, gives it its shard of the data and a bank client. Here the bank
is anything with ``push(key, class_ids, protos)``: a ``PrototypeBank`` in one process, or the
actor client in a cluster. Pushes are keyed (epoch, step, rank).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cpal_ray.cpal import cpal_step

log = logging.getLogger(__name__)


@dataclass
class Context:
    """Context prototypes as the training step sees them: (N, P, D), counts (N,), version."""
    prototypes: torch.Tensor
    counts: torch.Tensor
    version: int

    @classmethod
    def from_numpy(cls, ctx: np.ndarray, counts: np.ndarray, version: int) -> "Context":
        # Copies: arrays from Ray's object store are read-only.
        return cls(torch.from_numpy(np.array(ctx, dtype=np.float32)), torch.from_numpy(np.array(counts)), int(version))

    def to(self, device) -> "Context":
        return Context(self.prototypes.to(device), self.counts.to(device), self.version)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def push_prototypes(bank, key: tuple, protos: torch.Tensor | None, valid: torch.Tensor | None) -> dict[int, int]:
    """Send the valid instance prototypes of one step to the bank; returns {class: count} pushed."""
    if bank is None or protos is None:
        return {}
    idx = valid.nonzero(as_tuple=False)  # (M, 2): (image, class)
    class_ids = idx[:, 1].cpu().numpy()
    vectors = protos[idx[:, 0], idx[:, 1]].detach().cpu().numpy().astype(np.float32)
    bank.push(key, class_ids, vectors)
    u, c = np.unique(class_ids, return_counts=True)
    return {int(a): int(b) for a, b in zip(u, c)}


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, cfg, *,
                    epoch: int, device: torch.device | str = "cpu", bank=None, context: Context | None = None,
                    rank: int = 0, max_steps: int = 0, on_step: Callable[[int, int], Context | None] | None = None,
                    logger: Callable[[str], None] | None = None) -> dict:
    """One epoch of CPAL (or the BCE baseline when ``cfg.cpal.enabled`` is False).

    Args:
        model: CAMNet, possibly DDP-wrapped (its forward returns the dict of DESIGN.md).
        loader: yields dicts with "image" (B, 3, H, W) and "label" (B, N).
        optimizer, scheduler: from ``cpal_ray.engine.optim``; the scheduler steps every step.
        cfg: the full Config.
        epoch: epoch index (part of every bank key).
        bank: receives ``push((epoch, step, rank), class_ids, protos)``; None = no bank.
        context: context prototypes for this epoch (None before the first clustering).
        max_steps: stop after this many steps (0 = whole loader).
        on_step: called as ``on_step(step, n_steps_done)`` after each step; may return a new
            Context (warm-up clustering) or raise (fault injection).
    Returns a dict of epoch means and counters (loss, bce, self, steps, images, pushed per class,
    data/step seconds).
    """
    model.train()
    say = logger or log.info
    ctx = context.to(device) if context is not None else None
    sums = {"loss": 0.0, "bce": 0.0, "self": 0.0}
    pushed: dict[int, int] = {}
    steps = images = self_images = 0
    data_time = step_time = 0.0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    t_data = time.perf_counter()
    for step, batch in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        t_step = time.perf_counter()
        data_time += t_step - t_data
        x = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        out = model(x)
        terms = cpal_step(out, labels, cfg.cpal, ctx.prototypes if ctx else None, ctx.counts if ctx else None)
        # Keep every parameter in the graph (the projection head is idle in the baseline and
        # before the first clustering) so DDP needs no unused-parameter search.
        loss = terms["loss"] + 0.0 * out["z"].sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step} (rank {rank}): "
                                     f"{ {k: float(terms[k].detach()) for k in ('loss', 'bce', 'self')} }")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        for c, n in push_prototypes(bank, (epoch, step, rank), terms["protos"], terms["proto_valid"]).items():
            pushed[c] = pushed.get(c, 0) + n
        values = {k: float(terms[k].detach()) for k in sums}
        for k in sums:
            sums[k] += values[k]
        steps += 1
        images += x.shape[0]
        self_images += terms["self_images"]
        step_time += time.perf_counter() - t_step
        if step % cfg.train.log_every == 0:
            say(f"epoch {epoch} step {step} rank {rank}: loss {values['loss']:.4f} "
                f"bce {values['bce']:.4f} self {values['self']:.4f} lr {optimizer.param_groups[0]['lr']:.2e}")
        if on_step is not None:
            new_ctx = on_step(step, steps)
            if new_ctx is not None:
                ctx = new_ctx.to(device)
        t_data = time.perf_counter()
    n = max(steps, 1)
    return {**{k: v / n for k, v in sums.items()}, "steps": steps, "images": images, "self_images": self_images,
            "pushed": pushed, "data_seconds": data_time, "step_seconds": step_time,
            "context_version": ctx.version if ctx else 0}


@torch.inference_mode()
def evaluate_seeds(model: torch.nn.Module, dataset, cfg, *, device: torch.device | str = "cpu",
                   context: Context | None = None, max_images: int = 0, scales=None, flip=None,
                   cam_source: str | None = None) -> dict:
    """Seed mIoU of multi-scale CAMs (or PACAMs) over ``dataset`` with the background-threshold sweep.

    Uses ``cpal_ray.inference`` (one ConfusionMatrix per threshold). ``scales``/``flip``/
    ``cam_source`` override ``cfg.inference``. Returns the sweep's results dict (``best_miou``,
    ``best_threshold``, curve, per-class IoU).
    """
    from cpal_ray.inference.metrics import ThresholdSweep, thresholds_from_config
    from cpal_ray.inference.multiscale import multiscale_cams

    net = _unwrap(model)
    net.eval()
    source = cam_source or cfg.inference.cam_source
    if source == "pacam" and context is None:
        raise ValueError("cam_source='pacam' needs context prototypes (a CPAL checkpoint after one clustering)")
    sweep = ThresholdSweep(cfg.data.num_classes + 1, thresholds_from_config(cfg.inference))
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    for i in range(n):
        item = dataset[i]
        ctx = context.to(device) if (context is not None and source == "pacam") else None
        res = multiscale_cams(net, item["image"].to(device), item["label"],
                              scales=tuple(scales or cfg.inference.scales),
                              flip=cfg.inference.flip if flip is None else flip,
                              context=ctx.prototypes if ctx else None, counts=ctx.counts if ctx else None,
                              cpal_cfg=cfg.cpal)
        cams = res["pacam"] if source == "pacam" else res["cam"]
        sweep.update(cams, res["classes"], item["mask"].numpy())
    out = sweep.results()
    out["images"] = n
    out["cam_source"] = source
    return out
