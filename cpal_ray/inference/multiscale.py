"""Multi-scale, flip-augmented CAMs for seed evaluation and pseudo-labels (IRN / SIPE recipe).

For every scale s the image is resized (bilinear, align_corners=False) to round(s·H)×round(s·W)
and run through the model together with its horizontal flip (one batch of 2 per image). The
ReLU'd raw CAMs of the image's positive classes are kept, the flipped half is flipped back and
added. Each scale's map is resized to the feature grid of scale 1.0 — ceil(H/16)×ceil(W/16) for
CAMNet's output stride 16 — and summed there; the sum is upsampled to H×W (bilinear) and each
class map divided by its max (+1e-5, Eq. 3). Summing on the feature grid (rather than at H×W
per scale, as SIPE does) follows the spec: one upsample to image size per image instead of one
per scale, and identical at scale 1.0.

With ``context`` (N, P, D) and ``counts`` (N,) given, the prototype-aware CAM (Eq. 13) is
computed on the same forward outputs at every scale and aggregated the same way ("pacam").
It is computed per view (batch of 1): the alignment of Eq. 12 averages over its batch, so a
shared batch would couple an image to its flip and to the other images of the forward.

Three entry points give the same numbers (to float rounding):
- ``multiscale_cams``: one image.
- ``batched_multiscale_cams``: a list of images; same-size images share one forward per scale.
- ``naive_multiscale_cams``: one forward per scale, per flip, per image (the reference).

Model contract (DESIGN.md): ``model(x)`` -> dict with "cams" (B, N, h, w) raw and "z" (B, D, h, w).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cpal_ray.cpal.cams import CAM_EPS
from cpal_ray.cpal.loss import prototype_aware_cam_from_outputs
from cpal_ray.data.classes import positive_classes

FEATURE_STRIDE = 16

PacamFn = Callable[..., torch.Tensor]


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) -> (round(s·H), round(s·W)), at least 1 pixel each."""
    return max(1, int(round(size[0] * scale))), max(1, int(round(size[1] * scale)))


def feature_size(size: tuple[int, int], stride: int = FEATURE_STRIDE) -> tuple[int, int]:
    """Feature grid of an (H, W) image at the given output stride: (ceil(H/stride), ceil(W/stride))."""
    return math.ceil(size[0] / stride), math.ceil(size[1] / stride)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to size (align_corners=False); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """model.eval() and torch.inference_mode() for the block; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _default_pacam_fn() -> PacamFn:
    """The PACAM from network outputs: (z, cams_raw, labels, context, counts, cfg) -> (B, N, h, w)."""
    return prototype_aware_cam_from_outputs


class _Pacam:
    """What the PACAM branch needs, moved to the model's device once."""

    def __init__(self, context, counts, cpal_cfg, pacam_fn, device):
        if cpal_cfg is None or (context is not None and counts is None):
            raise ValueError("the PACAM needs context, counts and cpal_cfg together")
        self.context = None if context is None else torch.as_tensor(context, dtype=torch.float32, device=device)
        self.counts = None if counts is None else torch.as_tensor(counts, device=device)
        self.cfg = cpal_cfg
        self.fn = pacam_fn if pacam_fn is not None else _default_pacam_fn()

    @classmethod
    def make(cls, context, counts, cpal_cfg, pacam_fn, device) -> "_Pacam | None":
        """The PACAM branch when there is one: context prototypes given, or a CPAL config whose
        PACAM needs none (``cpal.context = instance``, SIPE's IS-CAM from the image's own prototypes)."""
        own = bool(getattr(cpal_cfg, "own_prototypes", False))
        return cls(context, counts, cpal_cfg, pacam_fn, device) if context is not None or own else None


def _image_maps(acc_rows: dict[str, torch.Tensor], cls_dev: torch.Tensor, num_fg: int,
                size: tuple[int, int]) -> dict[str, np.ndarray]:
    """One image's summed maps {name: (C, h, w)} -> its positive classes' maps at (H, W); a PACAM
    with one channel more than the N foreground classes (the background prototype's, last) also
    gives "pacam_bg" (1, H, W), normalised the same way."""
    res = {name: _finalise(a[cls_dev], size) for name, a in acc_rows.items()}
    if "pacam" in acc_rows and acc_rows["pacam"].shape[0] == num_fg + 1:
        res["pacam_bg"] = _finalise(acc_rows["pacam"][num_fg:], size)
    return res


def _forward_maps(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                  pacam: _Pacam | None) -> dict[str, torch.Tensor]:
    """One forward. x: (B, 3, h', w'); labels: (B, N) -> {"cam": ReLU(raw) (B, N, h, w)[, "pacam"]}."""
    out = model(x)
    maps = {"cam": F.relu(out["cams"].float())}
    if pacam is not None:
        # One view at a time: Eq. 12's alignment averages over the batch, which would make an
        # image's PACAM depend on what it is batched with (and batched != naive).
        z, raw = out["z"], out["cams"]
        maps["pacam"] = torch.cat([
            pacam.fn(z[i:i + 1], raw[i:i + 1], labels[i:i + 1], pacam.context, pacam.counts, pacam.cfg)
            for i in range(x.shape[0])]).float()
    return maps


def _finalise(acc: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Summed maps (K, h, w) -> upsampled to (H, W), each divided by its max + 1e-5 -> float32 numpy."""
    up = _resize(acc[None], size)[0]
    up = up / (up.flatten(1).amax(1)[:, None, None] + CAM_EPS) if up.shape[0] else up
    return up.float().cpu().numpy()


def _empty_result(size: tuple[int, int], with_pacam: bool) -> dict[str, np.ndarray]:
    res = {"classes": np.zeros(0, dtype=np.int64), "cam": np.zeros((0, *size), dtype=np.float32)}
    if with_pacam:
        res["pacam"] = np.zeros((0, *size), dtype=np.float32)
    return res


def batched_multiscale_cams(model: torch.nn.Module, images: Sequence[torch.Tensor], labels: Sequence[Any],
                            scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), flip: bool = True,
                            context: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                            cpal_cfg: Any = None, max_batch: int | None = None,
                            feature_stride: int = FEATURE_STRIDE,
                            pacam_fn: PacamFn | None = None) -> list[dict[str, np.ndarray]]:
    """Multi-scale CAMs of several images, same-size images sharing each forward.

    images: list of (3, H_i, W_i) normalised float tensors; labels: list of (N,) multi-hot.
    Images of equal size are grouped (order kept) and each scale runs one forward of
    2·B images (B images and their flips), at most ``max_batch`` images per forward (None = all).
    context (N, P, D), counts (N,), cpal_cfg (CPALConfig): compute "pacam" too.
    pacam_fn: (z, cams_raw, labels, context, counts, cfg) -> (B, N, h, w) ReLU'd; default
    ``cpal_ray.cpal.loss.prototype_aware_cam_from_outputs``.
    Returns, per image, {"classes" (K,) int64, "cam" (K, H, W) float32 in [0, 1)[, "pacam"[, "pacam_bg"]]}
    ("pacam_bg" (1, H, W): the background prototype's map, ``cpal.background = prototype``).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not scales:
        raise ValueError("scales must not be empty")
    device = _model_device(model)
    pacam = _Pacam.make(context, counts, cpal_cfg, pacam_fn, device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"image {i} must be (3, H, W), got {tuple(img.shape)}")
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    results: list[dict[str, np.ndarray] | None] = [None] * len(images)

    with _eval_mode(model):
        for size, idx in groups.items():
            step = max_batch or len(idx)
            for start in range(0, len(idx), step):
                chunk = idx[start:start + step]
                x = torch.stack([images[i] for i in chunk]).to(device, torch.float32)
                lab = torch.stack([torch.as_tensor(labels[i]) for i in chunk]).to(device, torch.float32)
                grid = feature_size(size, feature_stride)
                acc: dict[str, torch.Tensor] = {}
                n = len(chunk)
                for s in scales:
                    xs = _resize(x, scaled_size(size, s))
                    if flip:
                        xs, ls = torch.cat([xs, xs.flip(-1)]), torch.cat([lab, lab])
                    else:
                        ls = lab
                    for name, m in _forward_maps(model, xs, ls, pacam).items():
                        if flip:
                            m = m[:n] + m[n:].flip(-1)
                        m = _resize(m, grid)
                        acc[name] = acc[name] + m if name in acc else m
                for row, i in enumerate(chunk):
                    classes = torch.from_numpy(positive_classes(labels[i]))
                    if classes.numel() == 0:
                        results[i] = _empty_result(size, pacam is not None)
                        continue
                    cls_dev = classes.to(device)
                    results[i] = {"classes": classes.numpy().astype(np.int64),
                                  **_image_maps({k: a[row] for k, a in acc.items()}, cls_dev, lab.shape[1], size)}
    return results  # type: ignore[return-value]


def multiscale_cams(model: torch.nn.Module, image: torch.Tensor, label: Any,
                    scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), flip: bool = True,
                    context: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                    cpal_cfg: Any = None, feature_stride: int = FEATURE_STRIDE,
                    pacam_fn: PacamFn | None = None) -> dict[str, np.ndarray]:
    """Multi-scale CAMs of one image (see the module doc for the recipe).

    image: (3, H, W) normalised float tensor; label: (N,) multi-hot; scales: e.g. (1.0, 0.5, 1.5, 2.0);
    flip: add each scale's horizontal flip (same forward, batch of 2).
    context (N, P, D) / counts (N,) / cpal_cfg: also return the PACAM.
    Returns {"classes" (K,) int64 positive classes, "cam" (K, H, W) float32 in [0, 1)[, "pacam" (K, H, W)]}.
    """
    return batched_multiscale_cams(model, [image], [label], scales, flip, context, counts, cpal_cfg,
                                   feature_stride=feature_stride, pacam_fn=pacam_fn)[0]


def naive_multiscale_cams(model: torch.nn.Module, image: torch.Tensor, label: Any,
                          scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), flip: bool = True,
                          context: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                          cpal_cfg: Any = None, feature_stride: int = FEATURE_STRIDE,
                          pacam_fn: PacamFn | None = None) -> dict[str, np.ndarray]:
    """Reference loop: one forward per scale and per flip of one image (batch of 1).

    Same arguments and result as ``multiscale_cams``; the benchmark baseline.
    """
    device = _model_device(model)
    pacam = _Pacam.make(context, counts, cpal_cfg, pacam_fn, device)
    size = tuple(image.shape[-2:])
    classes = torch.from_numpy(positive_classes(label))
    if classes.numel() == 0:
        return _empty_result(size, pacam is not None)
    cls_dev = classes.to(device)
    grid = feature_size(size, feature_stride)
    lab = torch.as_tensor(label).to(device, torch.float32)[None]
    acc: dict[str, torch.Tensor] = {}
    with _eval_mode(model):
        x = image.to(device, torch.float32)[None]
        for s in scales:
            xs = _resize(x, scaled_size(size, s))
            for flipped in ((False, True) if flip else (False,)):
                view = xs.flip(-1) if flipped else xs
                for name, m in _forward_maps(model, view, lab, pacam).items():
                    m = m[0]
                    if flipped:
                        m = m.flip(-1)
                    m = _resize(m[None], grid)[0]
                    acc[name] = acc[name] + m if name in acc else m
        return {"classes": classes.numpy().astype(np.int64), **_image_maps(acc, cls_dev, lab.shape[1], size)}
