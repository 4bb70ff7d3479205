"""The CPAL objective: Eq. (14) L_self and Eq. (1) the total loss, with every ablation switch.

``cpal_step`` is what a training step calls: from the network outputs and the current context
prototypes it returns the named loss terms and the instance prototypes for the bank.

Cold start (DESIGN.md, 'Reading the paper: cold start'): clustering runs at the start of each
epoch, so before the first one the bank has no context prototypes: ``context is None`` (or every
count is 0) and the step is BCE only, while instance prototypes are still produced and pushed. With
``cpal.warmup_cluster_steps = s > 0`` a first clustering runs after step s of epoch 0.
A positive class without context prototypes (never seen) excludes its image from L_self.

The skeleton switches (DESIGN.md, 'Reading the paper: PACAM space' and 'background'):
``cpal.background = prototype`` makes the background class N of the bank (``prototype_maps``), so
the PACAM has N + 1 channels made the same way; ``cpal.context = instance`` replaces the context
prototypes by the image's own (SIPE's IS-CAM, ``instance_cam``: no bank, L_self from the first
step); ``cpal.self_grad`` chooses which of the two maps L_self moves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cpal_ray.cpal.aware import (feature_alignment, instance_cam, neighbour_weights, positiveness_logits,
                                 prototype_aware_cam, select_neighbours)
from cpal_ray.cpal.cams import (centered_embedding, classification_loss, instance_prototypes, normalized_cams,
                                pacam_with_background, prototype_maps, region_prototypes, sipe_regions,
                                with_background)


def self_loss(cam: torch.Tensor, pacam: torch.Tensor, include: torch.Tensor | None = None,
              grad: str = "both") -> torch.Tensor:
    """Eq. (14): L_self = ||M - M~||_1 / (N + 1), averaged over pixels and images.

    cam, pacam: (B, N + 1, h, w) with background; include: (B,) bool, the images that take part
    (default all); grad: which map the loss moves — "both" (the paper), "cam" (the PACAM is a
    detached target) or "pacam" (the CAM is). Returns a scalar; 0 (with gradient graph) when no
    image takes part.
    """
    if grad == "cam":
        pacam = pacam.detach()
    elif grad == "pacam":
        cam = cam.detach()
    elif grad != "both":
        raise ValueError(f"unknown self_grad {grad!r}; choose 'both', 'cam' or 'pacam'")
    per_image = (cam - pacam).abs().mean(dim=(1, 2, 3))  # sum over N+1 channels / (N+1), mean over pixels
    if include is None:
        return per_image.mean()
    w = include.to(per_image.dtype)
    return (per_image * w).sum() / w.sum().clamp(min=1.0)


def total_loss(bce: torch.Tensor, lself: torch.Tensor, lambda_bce: float, lambda_self: float) -> torch.Tensor:
    """Eq. (1): L = lambda_BCE L_BCE + lambda_Self L_Self."""
    return lambda_bce * bce + lambda_self * lself


def bank_prototypes(z: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, cfg
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. (4) over the bank's classes (``prototype_maps``) with the config's region rule:
    M_n > tau (``cpal.region = threshold``, the paper) or SIPE's seed regions (``sipe_regions``).

    z: (B, D, h, w); cams: (B, N, h, w) normalised (no gradient needed); labels: (B, N)
    -> prototypes (B, C, D), valid (B, C), maps (B, C, h, w), labels (B, C); C = N or N + 1.
    """
    maps, labs = prototype_maps(cams, labels, cfg.background)
    if cfg.region == "sipe":
        protos, valid = region_prototypes(z, sipe_regions(z, cams, labels)[:, :maps.shape[1]], cfg.normalize_bank)
    else:
        protos, valid = instance_prototypes(z, maps, labs, cfg.tau, normalize=cfg.normalize_bank)
    return protos, valid, maps, labs


@dataclass
class PacamResult:
    pacam: torch.Tensor      # (B, N, h, w) prototype-aware CAM of the foreground classes
    usable: torch.Tensor     # (B,) bool: every positive class had context prototypes (and an anchor when needed)
    weights: torch.Tensor    # (B, N, P) normalised positiveness over the selected neighbours


def pacam_from_prototypes(z: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                          anchor_valid: torch.Tensor, context: torch.Tensor, counts: torch.Tensor, cfg) -> PacamResult:
    """Eqs. (12) -> (7) -> (6) -> (13) for one batch, following the config's ablation switches.

    z: (B, D, h, w); cams: (B, N, h, w) normalised; labels: (B, N); anchors: (B, N, D) instance
    prototypes (detached); anchor_valid: (B, N); context: (N, P, D); counts: (N,).
    """
    anchors = anchors.detach()
    if cfg.alignment:
        anchors = anchors + feature_alignment(anchors, anchor_valid, context, counts)[None]
    selected = select_neighbours(anchors, context, counts, cfg.top_k, enabled=cfg.neighbour_selection)
    logits = positiveness_logits(anchors, context, cfg.metric, cfg.gamma)
    weights = neighbour_weights(logits, selected, positiveness=cfg.positiveness)
    pacam = prototype_aware_cam(z, weights, context, labels, normalize=cfg.pacam_normalize)
    pos = labels > 0
    needs_anchor = cfg.neighbour_selection or cfg.positiveness or cfg.alignment
    ok = (counts[None, :] > 0) & (anchor_valid | (not needs_anchor))  # (B, N)
    usable = (ok | ~pos).all(dim=1)
    return PacamResult(pacam=pacam, usable=usable, weights=weights)


def prototype_aware_cam_from_outputs(z: torch.Tensor, cams_raw: torch.Tensor, labels: torch.Tensor,
                                     context: torch.Tensor | None, counts: torch.Tensor | None, cfg) -> torch.Tensor:
    """PACAM straight from network outputs (inference): anchors from the image's own CAM.

    z: (B, D, h, w) as the model gives it (centred here when ``cfg.center`` says so); cams_raw:
    (B, N, h, w); labels: (B, N); context (C, P, D) and counts (C,) over the bank's C classes
    (None with ``cfg.context = instance``: the image's own prototypes, SIPE's IS-CAM)
    -> (B, C, h, w), ReLU'd, zero for absent classes and for classes without context prototypes;
    C = N, or N + 1 with the background prototype's map last (``cfg.background = prototype``).
    """
    z = centered_embedding(z, cfg.center)
    anchors, valid, maps, labs = bank_prototypes(z, normalized_cams(cams_raw, labels), labels, cfg)
    if cfg.context == "instance":
        return instance_cam(z, anchors, labs, normalize=cfg.pacam_normalize)
    res = pacam_from_prototypes(z, maps, labs, anchors, valid, context.to(z.dtype), counts.to(z.device), cfg)
    return res.pacam * (counts.to(z.device) > 0).to(z.dtype)[None, :, None, None]


def cpal_step(out: dict, labels: torch.Tensor, cfg, context: torch.Tensor | None = None,
              counts: torch.Tensor | None = None) -> dict:
    """All loss terms of one training step.

    out: the model's dict (``cams`` raw (B, N, h, w), ``logits`` (B, N), ``z`` (B, D, h, w));
    labels: (B, N); cfg: CPALConfig; context/counts: the current context prototypes over the
    bank's C classes (at least one class with prototypes, as ``Context`` guarantees) or None
    before the first clustering (and always with ``cfg.context = instance``).
    The embedding is centred first when ``cfg.center`` says so (``centered_embedding``), so the
    pushed prototypes live in the same space as the PACAM's cosines.
    Returns {"loss", "bce", "self" (scalars), "protos" (B, C, D) detached (None without a bank),
    "proto_valid" (B, C),
    "self_images" (images in L_self), "pairs" (positive (image, class) pairs), "self_pairs" (those
    in L_self): counts as 0-dim tensors (or 0). With ``cfg.enabled`` False this is
    the plain CAM baseline (BCE only, no prototypes). Nothing here reads a device value on the
    host, so a step never waits for the GPU.
    """
    bce = classification_loss(out["logits"], labels)
    zero = bce.new_zeros(())
    result = {"bce": bce, "self": zero, "self_images": 0, "pairs": labels.sum(), "self_pairs": 0, "protos": None,
              "proto_valid": None}
    if not cfg.enabled:
        result["loss"] = cfg.lambda_bce * bce
        return result
    cams = normalized_cams(out["cams"], labels)
    z = centered_embedding(out["z"], cfg.center)
    lself, pacam, usable = zero, None, None
    if cfg.context == "instance":  # SIPE: the image's own prototypes, with their gradient
        protos, valid, maps, labs = bank_prototypes(z, cams.detach(), labels, cfg)
        if cfg.self_loss:
            pacam = instance_cam(z, protos, labs, normalize=cfg.pacam_normalize)
            usable = (valid | (labs == 0)).all(dim=1)
    else:
        with torch.no_grad():
            protos, valid, maps, labs = bank_prototypes(z.detach(), cams.detach(), labels, cfg)
        result["protos"], result["proto_valid"] = protos, valid
        if cfg.self_loss and context is not None and counts is not None:
            res = pacam_from_prototypes(z, maps, labs, protos, valid, context.to(z.dtype), counts.to(z.device), cfg)
            pacam, usable = res.pacam, res.usable
    if pacam is not None:
        # No usable image: self_loss is 0 (still in the graph), so no host-side test is needed.
        lself = self_loss(with_background(cams), pacam_with_background(pacam, labels.shape[1], cfg.background),
                          usable, grad=cfg.self_grad)
        result["self_images"] = usable.sum()
        result["self_pairs"] = (labels * usable[:, None].to(labels.dtype)).sum()
    result["self"] = lself
    result["loss"] = total_loss(bce, lself, cfg.lambda_bce, cfg.lambda_self)
    return result
