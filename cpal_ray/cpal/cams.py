"""CAMs and instance prototypes: Eqs. (2), (3), (4) of CPAL, the background map, and the
pixel embedding the prototypes and the PACAM's cosines are taken in.

Letters: B batch, N foreground classes, D projection dim, h x w feature map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# SIPE's epsilon in the max normalisation: an all-zero map stays zero (DESIGN.md, 'Reading the paper:
# usual definitions').
CAM_EPS = 1e-5


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. (2): multi-label BCE on the GAP logits (the paper drops the minus sign; DESIGN.md,
    'Reading the paper: usual definitions').

    logits: (B, N); labels: (B, N) in {0, 1} -> scalar, mean over B and N.
    """
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def normalized_cams(cams_raw: torch.Tensor, labels: torch.Tensor | None = None, eps: float = CAM_EPS) -> torch.Tensor:
    """Eq. (3): M_n = ReLU(w_n^T f) / max ReLU(w_n^T f).

    cams_raw: (B, N, h, w) raw classifier maps; labels: (B, N) multi-hot or None.
    Returns (B, N, h, w) in [0, 1]; classes absent from the image are zeroed when labels are
    given (absent classes are zero in both M and PACAM: DESIGN.md, 'Reading the paper: background').
    """
    m = F.relu(cams_raw)
    peak = m.flatten(2).amax(dim=2)[..., None, None]  # (B, N, 1, 1)
    m = m / (peak + eps)
    if labels is not None:
        m = m * labels.to(m.dtype)[..., None, None]
    return m


def background_map(fg: torch.Tensor) -> torch.Tensor:
    """M_b = 1 - max_n M_n (Sec. 3.1, following SEAM).

    fg: (B, N, h, w) foreground maps in [0, 1] -> (B, 1, h, w).
    """
    return 1.0 - fg.amax(dim=1, keepdim=True)


def with_background(fg: torch.Tensor, bg: torch.Tensor | None = None) -> torch.Tensor:
    """M = M_b ∪ M_f with the background as channel 0 (VOC label order).

    fg: (B, N, h, w); bg: (B, 1, h, w), default ``background_map(fg)`` = 1 - max_n -> (B, N + 1, h, w).
    """
    return torch.cat([background_map(fg) if bg is None else bg, fg], dim=1)


def prototype_maps(cams: torch.Tensor, labels: torch.Tensor, background: str = "one_minus_max"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps and labels prototypes are taken over (the bank's classes; DESIGN.md, 'Reading the paper: background').

    "one_minus_max": the N foreground classes as they are. "prototype": the background is one
    more class, appended as class N: its map M_b = 1 - max_n M_n, its label always 1 (every image
    has background), so Eq. (4) gives it an instance prototype like any class.
    cams: (B, N, h, w) normalised; labels: (B, N) -> maps (B, C, h, w), labels (B, C), C = N or N + 1.
    """
    if background == "one_minus_max":
        return cams, labels
    if background == "prototype":
        return (torch.cat([cams, background_map(cams)], dim=1),
                torch.cat([labels, labels.new_ones(labels.shape[0], 1)], dim=1))
    raise ValueError(f"unknown PACAM background {background!r}; choose 'one_minus_max' or 'prototype'")


def pacam_with_background(pacam: torch.Tensor, num_fg: int, background: str = "one_minus_max") -> torch.Tensor:
    """The PACAM as L_self compares it, background first: (B, C, h, w) over the bank's classes ->
    (B, N + 1, h, w). "one_minus_max" derives M~_b = 1 - max_n M~_n; "prototype" takes the
    background prototype's own map (class N of ``prototype_maps``)."""
    if background == "prototype":
        return with_background(pacam[:, :num_fg], bg=pacam[:, num_fg:num_fg + 1])
    return with_background(pacam)


def centered_embedding(z: torch.Tensor, center: str = "none") -> torch.Tensor:
    """The pixel embedding of Eqs. (4) and (13): z as the network gives it, or centred.

    "none": z unchanged (the paper; DESIGN.md, 'Reading the paper: PACAM space'). "image":
    z(j) - mean_j z(j), each image's mean over its h x w feature grid (padding included) removed
    before anything else — prototypes (Eq. 4), the bank, alignment (Eq. 12) and the cosines of
    Eq. (13) all live in the centred space.
    Why: embeddings of ReLU features share a large common component, so cos(z(j), p) is high at
    every pixel and the PACAM is flat; centred pixels of one image cannot all point the same way.
    It is a function of the image alone, so training and inference compute it the same way.
    z: (B, D, h, w) -> (B, D, h, w).
    """
    if center == "none":
        return z
    if center == "image":
        return z - z.mean(dim=(2, 3), keepdim=True)
    raise ValueError(f"unknown embedding centring {center!r}; choose 'none' or 'image'")


def instance_prototypes(z: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, tau: float,
                        normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (4): P^I_n = sum_j 1[M_n(j) > tau] z(j) / sum_j 1[M_n(j) > tau] (masked average pooling).

    The denominator is the mask area of class n (the paper's Σ P must be Σ P_n: DESIGN.md,
    'Reading the paper: mask area').
    z: (B, D, h, w) projected features; cams: (B, N, h, w) normalised CAMs M_n;
    labels: (B, N) multi-hot.
    Returns prototypes (B, N, D) and valid (B, N) bool: a class that is absent from the image or
    whose mask is empty gives no prototype (its row is zero and invalid, never pushed).
    With ``normalize`` the valid prototypes are L2-normalised (DESIGN.md, 'Reading the paper: normalised bank').
    """
    mask = (cams > tau).to(z.dtype) * labels.to(z.dtype)[..., None, None]  # (B, N, h, w)
    return region_prototypes(z, mask, normalize)


def region_prototypes(z: torch.Tensor, mask: torch.Tensor, normalize: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (4) over given regions: the mean of z over each class's mask.

    z: (B, D, h, w); mask: (B, N, h, w) in {0, 1} -> prototypes (B, N, D), valid (B, N) bool
    (an empty mask gives a zero, invalid row); ``normalize`` L2-normalises the valid ones.
    """
    area = mask.sum(dim=(2, 3))  # (B, N)
    summed = torch.einsum("bnhw,bdhw->bnd", mask, z)  # (B, N, D)
    protos = summed / area.clamp(min=1.0)[..., None]
    valid = area > 0
    if normalize:
        protos = F.normalize(protos, dim=-1) * valid[..., None].to(z.dtype)
    return protos, valid


# SIPE halves the background's score when it assigns pixels to regions (``get_seed``).
SIPE_BG_WEIGHT = 0.5


def sipe_regions(z: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, bg_weight: float = SIPE_BG_WEIGHT,
                 eps: float = CAM_EPS) -> torch.Tensor:
    """SIPE's seed regions (``cpal.region = sipe``): every pixel j goes to the one class c whose map
    overlaps most with j's feature correlation, IoU_c(j) = Σ_k r(j,k) M_c(k) / (Σ_k r(j,k) +
    Σ_k M_c(k) − Σ_k r(j,k) M_c(k)) with r(j,k) = ReLU(cos(z(j), z(k))); the background's map is
    M_b = 1 − max_n M_n and its IoU is multiplied by ``bg_weight``; absent classes get no pixel.

    z: (B, D, h, w) (no gradient is taken); cams: (B, N, h, w) normalised; labels: (B, N)
    -> (B, N + 1, h, w) in {0, 1}, the background last (the order of ``prototype_maps``).
    """
    B, N = labels.shape
    present = torch.cat([labels, labels.new_ones(B, 1)], dim=1).to(cams.dtype)  # (B, N + 1)
    maps = (torch.cat([cams, background_map(cams)], dim=1) * present[..., None, None]).flatten(2)  # (B, N+1, hw)
    unit = z.detach().flatten(2)
    unit = unit / (unit.norm(dim=1, keepdim=True) + eps)
    corr = F.relu(torch.einsum("bdj,bdk->bjk", unit, unit))  # (B, hw, hw)
    inter = torch.einsum("bjk,bck->bcj", corr, maps)
    union = corr.sum(-1)[:, None, :] + maps.sum(-1, keepdim=True) - inter
    iou = inter / union.clamp(min=eps)
    iou = torch.cat([iou[:, :N], iou[:, N:] * bg_weight], dim=1)
    seeds = F.one_hot(iou.argmax(dim=1), N + 1).permute(0, 2, 1).to(cams.dtype)  # (B, N + 1, hw)
    return (seeds * present[..., None]).reshape(B, N + 1, *cams.shape[-2:])
