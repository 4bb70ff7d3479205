"""What one training step computes for each ``train.task``: the loss and the terms the loop logs.

The loop (``engine.loop.train_one_epoch``) is the same for every network; only the step differs:

    cam       CAMNet, CPAL's L = BCE + lambda L_self (``cpal.cpal_step``) and the instance prototypes
    affinity  IRN's boundary network: affinity labels of the CRF seeds (pairs within
              ``affinity.radius``), affinities = 1 - max boundary on each pair's path, IRN's loss
    seg       DeepLabV3: per-pixel cross-entropy on the pseudo masks, 255 ignored

A step returns (loss to backpropagate, terms): ``terms`` holds a 0-d tensor for each name of
``TERMS[task]`` (``terms["loss"]`` is what is logged) and, for the CAM network, what the loop
needs for the bank and the L_self shares (``protos``, ``proto_valid``, ``self_images``, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cpal_ray.data.transforms import IGNORE_INDEX

TERMS = {"cam": ("loss", "bce", "self"), "affinity": ("loss", "bg_pos", "fg_pos", "neg"), "seg": ("loss", "ce")}


def cam_step(state, batch: dict, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """CPAL (or BCE alone): batch["label"] (B, N) multi-hot; see ``cpal_ray.cpal.cpal_step``."""
    from cpal_ray.cpal import cpal_step

    labels = batch["label"].to(state.device, non_blocking=True)
    out = state.model(x)
    ctx = state.context
    terms = cpal_step(out, labels, state.cfg.cpal, ctx.prototypes if ctx else None, ctx.counts if ctx else None)
    # Keep every parameter in the graph (the projection head is idle in the baseline and
    # before the first clustering) so DDP needs no unused-parameter search.
    return terms["loss"] + 0.0 * out["z"].sum(), terms


def seeds_at(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of label maps (B, H, W) to ``size`` (IRN rescales its seeds by 1/4
    with nearest neighbours). Returns (B, h, w) int64, 255 kept."""
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].long()


def affinity_step(state, batch: dict, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """IRN's affinity loss: batch["mask"] (B, S, S) seeds (0 bg, 1..N, 255 unknown); the boundary
    map B = sigmoid(logits) at stride 4; pairs within ``affinity.radius`` of the seeds resized to B."""
    from cpal_ray.refine import affinity_labels, affinity_loss, boundary_affinity

    radius = state.cfg.affinity.radius
    logits = state.model(x)["boundary_logits"]  # (B, h, w)
    seeds = seeds_at(batch["mask"].to(state.device, non_blocking=True), tuple(logits.shape[-2:]))
    terms = affinity_loss(boundary_affinity(torch.sigmoid(logits), radius), affinity_labels(seeds, radius))
    terms["loss"] = terms["affinity"]
    return terms["loss"], terms


def seg_step(state, batch: dict, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the (B, N + 1, S, S) logits against batch["mask"] (B, S, S), mean over the
    pixels that are not 255 (0 when a batch has none, instead of NaN)."""
    mask = batch["mask"].to(state.device, non_blocking=True)
    logits = state.model(x)["logits"]
    valid = (mask != IGNORE_INDEX).sum().clamp(min=1)
    ce = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="sum") / valid
    return ce, {"loss": ce, "ce": ce}


STEPS = {"cam": cam_step, "affinity": affinity_step, "seg": seg_step}
