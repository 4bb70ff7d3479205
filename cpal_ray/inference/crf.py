"""Dense CRF refinement of a label map, exactly as IRN's ``imutils.crf_inference_label``.

One image per call, pure numpy + pydensecrf (no torch, no Ray): the Ray Data stage maps it over
images. The unary is ``unary_from_labels(labels, n_labels, gt_prob, zero_unsure=False)`` (every
label value, background included, is a real label); the pairwise terms are a Gaussian
(sxy=3, compat=3) and a bilateral (sxy=50, srgb=5, compat=10) kernel; 10 mean-field iterations.
"""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels

from cpal_ray.config import PseudoLabelConfig


# The CRF parameters are the fields of ``PseudoLabelConfig`` (gt_prob, gauss_*, bilateral_*,
# crf_iters), validated there; its defaults are IRN's.
IRN_CRF = PseudoLabelConfig()


def crf_refine_labels(rgb: np.ndarray, labels: np.ndarray, n_labels: int,
                      params: PseudoLabelConfig = IRN_CRF) -> np.ndarray:
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
    q = d.inference(params.crf_iters)
    return np.argmax(np.array(q).reshape((n_labels, h, w)), axis=0).astype(np.int64)
