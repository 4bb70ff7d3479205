"""Dense CRF refinement of a label map, exactly as IRN's ``imutils.crf_inference_label``.

One image per call, pure numpy + pydensecrf (no torch, no Ray): the Ray Data stage maps it over
images. The unary is ``unary_from_labels(labels, n_labels, gt_prob, zero_unsure=False)`` (every
label value, background included, is a real label); the pairwise terms are a Gaussian
(sxy=3, compat=3) and a bilateral (sxy=50, srgb=5, compat=10) kernel; 10 mean-field iterations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels


@dataclass(frozen=True)
class CRFParams:
    """DenseCRF parameters; the defaults are IRN's."""

    # Probability given to the seed label in the unary (the rest is spread over the others).
    gt_prob: float = 0.7
    # Smoothness kernel.
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    # Appearance kernel.
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    # Mean-field iterations.
    iters: int = 10

    def __post_init__(self):
        if not 0 < self.gt_prob < 1:
            raise ValueError(f"gt_prob must be in (0, 1), got {self.gt_prob}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")

    @classmethod
    def from_config(cls, cfg) -> "CRFParams":
        """From a ``PseudoLabelConfig`` (fields gt_prob, gauss_*, bilateral_*, crf_iters)."""
        return cls(gt_prob=cfg.gt_prob, gauss_sxy=cfg.gauss_sxy, gauss_compat=cfg.gauss_compat,
                   bilateral_sxy=cfg.bilateral_sxy, bilateral_srgb=cfg.bilateral_srgb,
                   bilateral_compat=cfg.bilateral_compat, iters=cfg.crf_iters)


IRN_CRF = CRFParams()


def crf_refine_labels(rgb: np.ndarray, labels: np.ndarray, n_labels: int,
                      params: CRFParams = IRN_CRF) -> np.ndarray:
    """Refine a label map with a fully connected CRF (IRN's recipe).

    rgb: (H, W, 3) uint8 image; labels: (H, W) int in [0, n_labels) (indices, not class ids);
    n_labels: number of labels in play (K + 1 with background). Returns (H, W) int64 in
    [0, n_labels). With a single label there is nothing to refine and zeros come back
    (``unary_from_labels`` would divide by n_labels - 1 = 0).
    """
    rgb = np.asarray(rgb)
    labels = np.asarray(labels)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    if labels.shape != (h, w):
        raise ValueError(f"labels shape {labels.shape} != image shape {(h, w)}")
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must be in [0, {n_labels}), got [{labels.min()}, {labels.max()}]")
    if n_labels == 1:
        return np.zeros((h, w), dtype=np.int64)

    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=params.gt_prob,
                                       zero_unsure=False))
    d.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    # A writable C-contiguous copy: pydensecrf rejects read-only buffers (PIL views, Ray objects).
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                           rgbim=np.array(rgb, order="C", copy=True), compat=params.bilateral_compat)
    q = d.inference(params.iters)
    return np.argmax(np.array(q).reshape((n_labels, h, w)), axis=0).astype(np.int64)
