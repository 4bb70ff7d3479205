"""Per-image refinement, pure torch: a boundary map from the trained network, the random walk of
the image's CAMs over its affinities, and the segmenter's prediction.

    boundary = boundary_map(edge_net, image)                    # (ceil(H/4), ceil(W/4)) in [0, 1]
    label = walk_label(cams, classes, boundary, cfg.affinity)   # (H, W) class ids 0..N
    probs = segment(seg_net, image, scales, flip)               # (N + 1, H, W) softmax

IRN's make_sem_seg_labels.py, step by step: the boundary is the sigmoid of the mean of the
image's and its mirror's logits; the CAMs go to stride 4 (here averaged over each stride-4 cell
of the full-size CAM files, then each divided by its max, as IRN's strided CAMs are) and are
walked (``propagate_cams``); the walked maps are upsampled x4 (bilinear) and cropped to the
image, and ``labels_from_walk`` puts the constant background score in front of the argmax.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cpal_ray.refine.affinity import labels_from_walk, propagate_cams


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def boundary_map(edge_net: torch.nn.Module, image: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """image (3, H, W) normalised -> boundary (ceil(H/4), ceil(W/4)) in [0, 1] on the CPU:
    sigmoid of the logits, averaged with the mirrored image's (IRN) when ``flip``."""
    edge_net.eval()
    x = image[None].to(_device(edge_net))
    logits = edge_net(x)["boundary_logits"][0]
    if flip:
        logits = (logits + edge_net(x.flip(-1))["boundary_logits"][0].flip(-1)) / 2
    return torch.sigmoid(logits).float().cpu()


def strided_cams(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Full-size CAMs (K, H, W) -> (K, h, w) = ``size``: mean over each cell, then each map divided
    by its max (maps that are all 0 stay 0)."""
    small = F.adaptive_avg_pool2d(cams[None].float(), size)[0]
    peak = small.flatten(1).amax(dim=1).clamp(min=1e-5)
    return small / peak[:, None, None]


@torch.inference_mode()
def walk_label(cams, classes, boundary: torch.Tensor, affinity_cfg) -> np.ndarray:
    """The pseudo mask of one image: its CAMs walked over the boundary's affinities.

    cams: (K, H, W) the image's positive-class CAMs (a CAM file's maps); classes: (K,) their
    indices 0..N-1; boundary: (h, w) from ``boundary_map``; affinity_cfg: ``AffinityConfig``
    (walk_radius, beta, exp_times, walk_mode, bg_threshold). Returns (H, W) uint8 class ids
    0..N (background 0; a pseudo mask has no 255).
    """
    cams = torch.as_tensor(np.asarray(cams, dtype=np.float32))
    classes = torch.as_tensor(np.asarray(classes, dtype=np.int64))
    height, width = cams.shape[-2:]
    if cams.shape[0] == 0:
        return np.zeros((height, width), np.uint8)
    c = affinity_cfg
    walked = propagate_cams(strided_cams(cams, tuple(boundary.shape)), boundary.float(), radius=c.walk_radius,
                            beta=c.beta, exp_times=c.exp_times, mode=c.walk_mode)
    h, w = boundary.shape
    up = F.interpolate(walked[None], size=(4 * h, 4 * w), mode="bilinear", align_corners=False)[0, :, :height, :width]
    return labels_from_walk(up, classes, c.bg_threshold).numpy().astype(np.uint8)


@torch.inference_mode()
def segment(seg_net: torch.nn.Module, image: torch.Tensor, scales=(1.0,), flip: bool = False) -> torch.Tensor:
    """image (3, H, W) normalised -> class probabilities (N + 1, H, W) on the CPU: the softmax of
    the logits at each scale (and mirrored, when ``flip``), resized to (H, W) and averaged."""
    seg_net.eval()
    x = image[None].to(_device(seg_net))
    size = tuple(x.shape[-2:])
    total, n = None, 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(max(1, round(size[0] * s)), max(1, round(size[1] * s))),
                                              mode="bilinear", align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            logits = seg_net(xs.flip(-1) if mirrored else xs)["logits"]
            logits = logits.flip(-1) if mirrored else logits
            p = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(dim=1)[0]
            total = p if total is None else total + p
            n += 1
    return (total / n).float().cpu()
