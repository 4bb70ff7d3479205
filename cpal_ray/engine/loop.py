"""One training epoch: plain PyTorch, the same code in one process and in a Ray worker.

``train_one_epoch`` runs the steps of one epoch on a ``TrainState`` (``cpal_ray.engine.fit``):
forward and loss terms (the step of ``train.task``, ``engine.tasks``: CPAL's for the CAM network,
IRN's affinity loss, the segmenter's cross-entropy), backward, SGD + poly step. That is all: what
a task does with a step's terms besides its loss (CPAL's hook, ``engine.cpal_hooks``) is done by
the hooks' ``after_step``, which get them.

No host synchronisation per step: loss terms are accumulated on the device. Timing, the loss
terms' means, the non-finite check (``FloatingPointError`` naming the epoch, the step and its loss
terms), the hooks' ``after_step`` and the progress report (rank 0's log line and bar) are the
loader's wrapper's, ``engine.progress.StepMeter``.
"""
from __future__ import annotations

import torch

from cpal_ray.engine.progress import StepMeter
from cpal_ray.engine.tasks import STEPS, TERMS


def train_one_epoch(state, loader, hooks=()) -> dict:
    """One epoch of ``cfg.train.task``: the CAM network (CPAL, or the BCE baseline), the affinity
    network or the segmenter (``engine.tasks``).

    state: the ``TrainState`` (model, possibly DDP-wrapped; optimizer; scheduler stepped every
        step; cfg; device; extras (what the task's hooks provide to its step); epoch; rank;
        steps_per_epoch).
    loader: yields dicts with "image" (B, 3, H, W), "label" (B, N) and "mask" (B, H, W).
    hooks: objects with ``after_step(state, step, outputs)`` (``outputs``: the step's terms); on
        every ``train.log_every``-th step ``state.logged`` holds that step's loss terms and lr (None
        on the others).
    Returns epoch means of the task's terms (``TERMS``: loss/bce/self for CPAL), and steps, images,
    skipped_ids (unreadable samples replaced in their batch, see ``cpal_ray.data.SkipUnreadable``),
    data_seconds, step_seconds, lr.
    """
    cfg, model, optimizer, device = state.cfg, state.model, state.optimizer, state.device
    model.train()
    names, step_fn = TERMS[cfg.train.task], STEPS[cfg.train.task]
    meter = StepMeter(state, names, hooks)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    skipped: set[str] = set()
    images = 0
    for step, batch in meter.log_every(loader):
        skipped.update(sid for ids in batch.get("skipped", ()) for sid in ids.split())
        x = batch["image"].to(device, non_blocking=True)
        loss, terms = step_fn(state, batch, x)
        values = torch.stack([terms[k].detach() for k in names])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        state.scheduler.step()
        images += x.shape[0]
        meter.update(values, terms)  # timing, means, non-finite check, hooks, progress: engine.progress
    return {**dict(zip(names, meter.means())), "steps": meter.steps, "images": images,
            "skipped_ids": sorted(skipped), "data_seconds": meter.data_seconds, "step_seconds": meter.step_seconds,
            "lr": optimizer.param_groups[0]["lr"]}
