"""One training epoch: plain PyTorch, the same code in one process and in a Ray worker.

``train_one_epoch`` runs the steps of one epoch on a ``TrainState`` (``cpal_ray.engine.fit``):
forward and loss terms (the step of ``train.task``, ``engine.tasks``: CPAL's for the CAM network,
IRN's affinity loss, the segmenter's cross-entropy), backward, SGD + poly step, for CPAL the
push of the instance prototypes to the bank (keyed (epoch, step, rank)), then every hook's
``after_step``.

No host synchronisation per step beyond the bank push (the prototypes must reach the bank):
loss terms and the L_self image count are accumulated on the device. Timing, the loss terms'
means, the non-finite check (``FloatingPointError`` naming the epoch, the step and its loss
terms), the hooks' ``after_step`` and the progress report (rank 0's log line and bar) are the
loader's wrapper's, ``engine.progress.StepMeter``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from cpal_ray.engine.progress import StepMeter
from cpal_ray.engine.tasks import STEPS, TERMS

log = logging.getLogger(__name__)


def push_prototypes(bank, key: tuple, protos: torch.Tensor | None, valid: torch.Tensor | None) -> dict[int, int]:
    """Send the valid instance prototypes of one step to the bank; returns {class: count} pushed.

    protos: (B, N, D); valid: (B, N) bool. One device-to-host copy (the bank lives on the host).
    """
    if bank is None or protos is None:
        return {}
    idx = valid.nonzero(as_tuple=False).cpu()  # (M, 2): (image, class)
    class_ids = idx[:, 1].numpy()
    vectors = protos.detach()[idx[:, 0], idx[:, 1]].cpu().numpy().astype(np.float32)
    bank.push(key, class_ids, vectors)
    u, c = np.unique(class_ids, return_counts=True)
    return {int(a): int(b) for a, b in zip(u, c)}


def train_one_epoch(state, loader, hooks=()) -> dict:
    """One epoch of ``cfg.train.task``: CPAL (the BCE baseline when ``cfg.cpal.enabled`` is False),
    the affinity network or the segmenter (``engine.tasks``).

    state: the ``TrainState`` (model, possibly DDP-wrapped; optimizer; scheduler stepped every
        step; cfg; device; bank (``push`` per step, None = no bank); context (None before the
        first clustering, may be replaced by a hook mid-epoch); epoch; rank; steps_per_epoch).
    loader: yields dicts with "image" (B, 3, H, W), "label" (B, N) and "mask" (B, H, W).
    hooks: objects with ``after_step(state, step)``; on every ``train.log_every``-th step
        ``state.logged`` holds that step's loss terms and lr (None on the others).
    Returns epoch means of the task's terms (``TERMS``: loss/bce/self for CPAL), and steps, images, self_images (images in L_self),
    self_image_share and self_class_share (the shares of images and of positive (image, class)
    pairs that took part in L_self), pushed ({class: count}), skipped_ids (unreadable samples
    replaced in their batch, see ``cpal_ray.data.SkipUnreadable``), data_seconds, step_seconds,
    context_version (at the epoch's end).
    """
    cfg, model, optimizer, device = state.cfg, state.model, state.optimizer, state.device
    model.train()
    names, step_fn = TERMS[cfg.train.task], STEPS[cfg.train.task]
    meter = StepMeter(state, names, hooks)
    counts = torch.zeros(3, device=device)  # CPAL: images in L_self, positive pairs, pairs in L_self
    params = [p for g in optimizer.param_groups for p in g["params"]]
    pushed: dict[int, int] = {}
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
        for c, n in push_prototypes(state.bank, (state.epoch, step, state.rank), terms.get("protos"),
                                    terms.get("proto_valid")).items():
            pushed[c] = pushed.get(c, 0) + n
        if "pairs" in terms:
            counts += torch.stack([torch.as_tensor(terms[k], dtype=counts.dtype, device=device)
                                   for k in ("self_images", "pairs", "self_pairs")])
        images += x.shape[0]
        meter.update(values)  # timing, means, non-finite check, hooks, progress: engine.progress
    means = meter.means()
    self_images, pairs, self_pairs = counts.tolist()
    return {**dict(zip(names, means)), "steps": meter.steps, "images": images, "self_images": int(self_images),
            "self_image_share": self_images / max(images, 1), "self_class_share": self_pairs / max(pairs, 1),
            "pushed": pushed, "skipped_ids": sorted(skipped), "data_seconds": meter.data_seconds,
            "step_seconds": meter.step_seconds, "lr": optimizer.param_groups[0]["lr"],
            "context_version": state.context.version if state.context else 0}
