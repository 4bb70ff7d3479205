"""Pseudo-labels from CAMs: IRN's confident fg/bg rule, or CRF-refined argmax seeds.

Inputs are one image's normalised CAMs of its positive classes: ``cams`` (K, H, W) in [0, 1]
with ``classes`` (K,) foreground indices in 0..N-1. Internally labels are indices into
``keys = [0, classes + 1]`` (0 = background); outputs are class ids in {0..N} plus 255.
"""
from __future__ import annotations

import numpy as np

from cpal_ray.config import PseudoLabelConfig
from cpal_ray.inference.crf import IRN_CRF, crf_refine_labels

IGNORE = 255


def _check_inputs(rgb: np.ndarray, cams: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cams = np.asarray(cams, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != classes.shape[0]:
        raise ValueError(f"cams must be (K={classes.shape[0]}, H, W), got {cams.shape}")
    if cams.shape[1:] != np.asarray(rgb).shape[:2]:
        raise ValueError(f"cams size {cams.shape[1:]} != image size {np.asarray(rgb).shape[:2]}")
    if classes.size and (classes.min() < 0 or classes.max() >= IGNORE - 1):
        raise ValueError(f"classes must be in 0..{IGNORE - 2}, got {classes.tolist()}")
    return cams, classes


def seed_indices(cams: np.ndarray, bg_score: float) -> np.ndarray:
    """argmax over [background = bg_score, cams] (background wins ties).

    cams: (K, H, W) -> (H, W) int64 in [0, K]: 0 = background, k = cams[k - 1].
    """
    scores = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=bg_score)
    return np.argmax(scores, axis=0)


def irn_pseudo_label(rgb: np.ndarray, cams: np.ndarray, classes: np.ndarray, conf_fg: float = 0.30,
                     conf_bg: float = 0.05, params: PseudoLabelConfig = IRN_CRF) -> np.ndarray:
    """IRN's ``cam_to_ir_label``: confident foreground and background, the rest ignored.

    fg_conf = keys[CRF(argmax [conf_fg, cams])] (a high background score: only strong CAM is fg);
    bg_conf = keys[CRF(argmax [conf_bg, cams])] (a low one: only weak CAM is bg). Then
    label = fg_conf where fg_conf is foreground; 0 where both say background; 255 where
    fg_conf says background but bg_conf says foreground.

    rgb: (H, W, 3) uint8; cams: (K, H, W); classes: (K,). Returns (H, W) uint8 in {0..N, 255}.
    An image without positive class (K = 0) is all background, as in IRN's derivatives.
    """
    cams, classes = _check_inputs(rgb, cams, classes)
    h, w = cams.shape[1:]
    if classes.size == 0:
        return np.zeros((h, w), dtype=np.uint8)
    keys = np.concatenate([[0], classes + 1])
    n_labels = keys.shape[0]
    fg_conf = keys[crf_refine_labels(rgb, seed_indices(cams, conf_fg), n_labels, params)]
    bg_conf = keys[crf_refine_labels(rgb, seed_indices(cams, conf_bg), n_labels, params)]
    conf = fg_conf.copy()
    conf[fg_conf == 0] = IGNORE
    conf[bg_conf + fg_conf == 0] = 0
    return conf.astype(np.uint8)


def crf_argmax_label(rgb: np.ndarray, cams: np.ndarray, classes: np.ndarray, bg_threshold: float = 0.15,
                     params: PseudoLabelConfig = IRN_CRF) -> np.ndarray:
    """Seeds (argmax with a constant background score ``bg_threshold``) refined by the CRF.

    rgb: (H, W, 3) uint8; cams: (K, H, W); classes: (K,). Returns (H, W) uint8 in {0..N}.
    """
    cams, classes = _check_inputs(rgb, cams, classes)
    h, w = cams.shape[1:]
    if classes.size == 0:
        return np.zeros((h, w), dtype=np.uint8)
    keys = np.concatenate([[0], classes + 1])
    pred = crf_refine_labels(rgb, seed_indices(cams, bg_threshold), keys.shape[0], params)
    return keys[pred].astype(np.uint8)


def pseudo_label_from_config(rgb: np.ndarray, cams: np.ndarray, classes: np.ndarray, cfg) -> np.ndarray:
    """Dispatch on a ``PseudoLabelConfig``: ``mode`` "irn" (with ``cfg.thresholds`` after the
    preset) or "crf_argmax" (with ``bg_threshold``); CRF parameters from the same config.
    Shapes as ``irn_pseudo_label``; returns (H, W) uint8.
    """
    if cfg.mode == "irn":
        conf_fg, conf_bg = cfg.thresholds
        return irn_pseudo_label(rgb, cams, classes, conf_fg, conf_bg, cfg)
    if cfg.mode == "crf_argmax":
        return crf_argmax_label(rgb, cams, classes, cfg.bg_threshold, cfg)
    raise ValueError(f"unknown pseudo-label mode {cfg.mode!r}")
