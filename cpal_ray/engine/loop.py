"""One training epoch: plain PyTorch, the same code in one process and in a Ray worker.

``train_one_epoch`` runs the steps of one epoch on a ``TrainState`` (``cpal_ray.engine.fit``):
forward and loss terms (the step of ``train.task``, ``engine.tasks``: CPAL's for the CAM network,
IRN's affinity loss, the segmenter's cross-entropy), backward, SGD + poly step, for CPAL the
push of the instance prototypes to the bank (keyed (epoch, step, rank)), then every hook's
``after_step``.

No host synchronisation per step beyond the bank push (the prototypes must reach the bank):
loss terms, the L_self image count and the first non-finite loss are accumulated on the device
and read every ``train.log_every`` steps and at the end of the epoch. A non-finite loss raises
``FloatingPointError`` naming the epoch, the step where it first happened and its loss terms
(at the next read, so at most ``log_every - 1`` steps later).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from cpal_ray.engine.tasks import STEPS, TERMS
from cpal_ray.numbers import progress

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


class _NonFiniteWatch:
    """Remembers, on the device, the first step whose loss terms were not all finite."""

    def __init__(self, device, names: tuple[str, ...]):
        self.names = names
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.values = torch.zeros(len(names), device=device)

    def update(self, step: int, values: torch.Tensor) -> None:
        first = (self.step < 0) & ~torch.isfinite(values).all()
        self.step = torch.where(first, torch.full_like(self.step, step), self.step)
        self.values = torch.where(first, values, self.values)

    def check(self, epoch: int, rank: int) -> None:
        step = int(self.step)  # the only read: a host sync every log_every steps
        if step >= 0:
            terms = dict(zip(self.names, self.values.tolist()))
            raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step} (rank {rank}): {terms}")


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
    state.logged = None
    names, step_fn = TERMS[cfg.train.task], STEPS[cfg.train.task]
    sums = torch.zeros(len(names), device=device)
    counts = torch.zeros(3, device=device)  # CPAL: images in L_self, positive pairs, pairs in L_self
    watch = _NonFiniteWatch(device, names)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    pushed: dict[int, int] = {}
    skipped: set[str] = set()
    steps = images = 0
    data_time = step_time = 0.0
    t_data = time.perf_counter()
    batches = progress(loader, f"epoch {state.epoch}", total=state.steps_per_epoch) if state.rank == 0 else loader
    for step, batch in enumerate(batches):
        if step >= state.steps_per_epoch:
            break
        t_step = time.perf_counter()
        data_time += t_step - t_data
        skipped.update(sid for ids in batch.get("skipped", ()) for sid in ids.split())
        x = batch["image"].to(device, non_blocking=True)
        loss, terms = step_fn(state, batch, x)
        values = torch.stack([terms[k].detach() for k in names])
        watch.update(step, values)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        state.scheduler.step()
        for c, n in push_prototypes(state.bank, (state.epoch, step, state.rank), terms.get("protos"),
                                    terms.get("proto_valid")).items():
            pushed[c] = pushed.get(c, 0) + n
        sums += values
        if "pairs" in terms:
            counts += torch.stack([torch.as_tensor(terms[k], dtype=counts.dtype, device=device)
                                   for k in ("self_images", "pairs", "self_pairs")])
        steps += 1
        images += x.shape[0]
        step_time += time.perf_counter() - t_step
        state.logged = None
        if step % cfg.train.log_every == 0:
            watch.check(state.epoch, state.rank)
            v = dict(zip(names, values.tolist()), lr=optimizer.param_groups[0]["lr"])
            state.logged = v  # hooks (tracking) see the values read at this step
            log.info(f"epoch {state.epoch} step {step} rank {state.rank}: "
                     + " ".join(f"{k} {v[k]:.4f}" for k in names) + f" lr {v['lr']:.2e}")
        for hook in hooks:
            hook.after_step(state, step)
        t_data = time.perf_counter()
    watch.check(state.epoch, state.rank)
    means = (sums / max(steps, 1)).tolist()
    self_images, pairs, self_pairs = counts.tolist()
    return {**dict(zip(names, means)), "steps": steps, "images": images, "self_images": int(self_images),
            "self_image_share": self_images / max(images, 1), "self_class_share": self_pairs / max(pairs, 1),
            "pushed": pushed, "skipped_ids": sorted(skipped), "data_seconds": data_time, "step_seconds": step_time,
            "context_version": state.context.version if state.context else 0}
