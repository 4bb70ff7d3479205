"""What one training step computes for each ``train.task``: the loss and the terms the loop logs.

The loop (``engine.loop.train_one_epoch``) is the same for every network; only the step differs:

    cam       CAMNet, CPAL's L = BCE + lambda L_self (``cpal.cpal_step``) and the instance prototypes
    affinity  IRN's boundary network: affinity labels of the CRF seeds (pairs within
              ``affinity.radius``), affinities = 1 - max boundary on each pair's path, IRN's loss
    seg       DeepLabV3: per-pixel cross-entropy on the pseudo masks, 255 ignored

A step returns (loss to backpropagate, terms): ``terms`` holds a 0-d tensor for each name of
``TERMS[task]`` (``terms["loss"]`` is what is logged) and, for the CAM network, what CPAL's hook
needs for the bank and the L_self shares (``protos``, ``proto_valid``, ``self_images``, ...): the
loop hands the terms to every hook's ``after_step``.

What else a task brings, beyond its step: ``task_hooks`` (the hooks its training needs: CPAL's
for the CAM network, ``engine.cpal_hooks``), ``CHECKPOINT_SECTIONS`` (the checkpoint keys those
hooks fill) and ``load_trained`` (the trained network of a checkpoint, with what inference needs).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from cpal_ray.config import Config
from cpal_ray.cpal import cpal_step
from cpal_ray.cpal.bank import Bank
from cpal_ray.cpal.shards import make_bank
from cpal_ray.data.transforms import IGNORE_INDEX
from cpal_ray.engine.checkpoint import CheckpointError, load_checkpoint
from cpal_ray.engine.cpal_hooks import CPALHook, checkpoint_context
from cpal_ray.engine.diagnostics_hook import DiagnosticsHook
from cpal_ray.engine.hooks import Hook
from cpal_ray.models import build_task_model, embed_dim
from cpal_ray.refine import affinity_labels, affinity_loss, boundary_affinity

TERMS = {"cam": ("loss", "bce", "self"), "affinity": ("loss", "bg_pos", "fg_pos", "neg"), "seg": ("loss", "ce")}


def cam_step(state, batch: dict, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """CPAL (or BCE alone): batch["label"] (B, N) multi-hot; see ``cpal_ray.cpal.cpal_step``."""
    labels = batch["label"].to(state.device, non_blocking=True)
    out = state.model(x)
    ctx = state.extras.get("context")  # CPAL's context prototypes (CPALHook), None before the first clustering
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

# Keys of every checkpoint that the tasks' hooks fill (``Hook.before_save_checkpoint``), None where
# no hook does (a baseline's, the affinity network's): the layout readers and old checkpoints know.
CHECKPOINT_SECTIONS = ("bank",)


def in_process_bank(cfg: Config) -> Bank:
    """The bank of a run in one process: one ``PrototypeBank``, or ``cpal.bank_shards`` of them."""
    return make_bank(cfg, embed_dim(cfg.model))


def task_hooks(cfg: Config, bank_factory: Callable[[], Bank | None] | None = None) -> list[Hook]:
    """The hooks the training of ``cfg.train.task`` needs (``fit`` orders them by priority).

    The CAM network: ``CPALHook`` with the bank ``bank_factory()`` gives when ``cfg.training.uses_bank``
    (default ``in_process_bank``; a Ray Train worker passes its ``BankClient``; None = no bank), then
    ``DiagnosticsHook``. The affinity network and the segmenter need none.
    """
    if cfg.train.task != "cam":
        return []
    bank = None
    if cfg.training.uses_bank:
        bank = bank_factory() if bank_factory is not None else in_process_bank(cfg)
    return [CPALHook(bank, cfg.cpal.warmup_cluster_steps), DiagnosticsHook(cfg, cfg.training.diag_images)]


def load_trained(folder, map_location="cpu", cfg: Config | None = None):
    """Rebuild a trained model from a checkpoint or ``final/`` folder: the network of the saved
    config's ``train.task`` (CAMNet, EdgeNet, SegNet).

    Returns (model in eval mode, Config (the saved one unless ``cfg`` is given), Context or None).
    No ImageNet weights are loaded (the checkpoint has all of them).
    """
    state = load_checkpoint(folder, map_location=map_location)
    cfg = cfg or state["config"]
    task = state["config"].train.task
    if cfg.train.task != task:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, task=task))
    no_weights = dataclasses.replace(cfg.model, pretrained=False, weights="")
    model = build_task_model(dataclasses.replace(cfg, model=no_weights))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: its weights do not fit the {cfg.model.backbone} network "
                              f"({str(e).splitlines()[0]})") from None
    model.eval()
    return model, cfg, checkpoint_context(state)
