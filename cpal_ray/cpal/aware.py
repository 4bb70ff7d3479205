"""Context prototype-aware learning: Eqs. (6), (7), (12), (13) of CPAL.

Context prototypes come padded: ``context`` (N, P, D) with ``counts`` (N,) valid rows per class
(rows >= counts[n] are padding; counts[n] == 0 = class never seen). The readings of the literal
equations follow docs/DESIGN.md's "Reading the paper" (cited by heading, e.g. (DESIGN.md, 'Reading
the paper: positiveness')) and are stated in each docstring.

Letters: B batch, N classes, P context prototypes per class, K top-K, D dim, h x w features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def context_valid_mask(counts: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Valid rows of the padded context tensor. counts: (N,) -> (N, P) bool."""
    return torch.arange(num_slots, device=counts.device)[None, :] < counts[:, None]


def feature_alignment(anchors: torch.Tensor, valid: torch.Tensor, context: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
    """Eq. (12): delta_n = 1/(N_p Q_n) sum_i sum_q (p_i - P^I_{n,q}) = mean_i p_i - mean_q P^I_{n,q}.

    The mean runs over the class's valid context prototypes and the Q_n instance prototypes of
    class n in this mini-batch (the worker's local batch under DDP; DESIGN.md, 'Reading the paper: alignment shift').
    anchors: (B, N, D); valid: (B, N) bool; context: (N, P, D); counts: (N,).
    Returns delta (N, D); zero for a class with no instance or no context prototype.
    """
    cmask = context_valid_mask(counts, context.shape[1]).to(context.dtype)  # (N, P)
    ctx_mean = (context * cmask[..., None]).sum(1) / counts.clamp(min=1)[:, None].to(context.dtype)
    v = valid.to(anchors.dtype)  # (B, N)
    q = v.sum(0)  # (N,) = Q_n
    inst_mean = (anchors * v[..., None]).sum(0) / q.clamp(min=1)[:, None]
    defined = ((q > 0) & (counts > 0)).to(anchors.dtype)[:, None]
    return (ctx_mean - inst_mean) * defined


def positiveness_logits(anchors: torch.Tensor, context: torch.Tensor, metric: str = "dot",
                        gamma: float = 1.0) -> torch.Tensor:
    """Eq. (7) before the softmax: sim(P^I_n, p_i) / gamma for every context prototype of class n.

    metric: "dot" (the paper's l1(P^I) x l2(p)^T with identity l1, l2), "cosine", "l1" / "l2"
    (negated Manhattan / Euclidean distance; Table 3). gamma acts as a softmax temperature
    (a constant divisor after the softmax would cancel in the normalised weights: DESIGN.md,
    'Reading the paper: similarity and gamma').
    anchors: (B, N, D); context: (N, P, D) -> (B, N, P).
    """
    if metric == "dot":
        sim = torch.einsum("bnd,npd->bnp", anchors, context)
    elif metric == "cosine":
        sim = torch.einsum("bnd,npd->bnp", F.normalize(anchors, dim=-1), F.normalize(context, dim=-1))
    elif metric in ("l1", "l2"):
        diff = anchors[:, :, None, :] - context[None]  # (B, N, P, D)
        sim = -(diff.abs().sum(-1) if metric == "l1" else diff.pow(2).sum(-1).clamp(min=0).sqrt())
    else:
        raise ValueError(f"unknown positiveness metric {metric!r}")
    return sim / gamma


def select_neighbours(anchors: torch.Tensor, context: torch.Tensor, counts: torch.Tensor, top_k: int,
                      enabled: bool = True) -> torch.Tensor:
    """Eq. (6): the top-K context prototypes by cosine similarity to the anchor.

    Positiveness w_i > 0 does not change a cosine ranking (DESIGN.md, 'Reading the paper: positiveness'), so ranking by
    cos(w_i p_i, P^I) = cos(p_i, P^I). A class with fewer than K prototypes keeps all of them.
    ``enabled=False`` (Table 2, "no neighbour selection") keeps every valid prototype.
    anchors: (B, N, D); context: (N, P, D); counts: (N,) -> selection mask (B, N, P) bool.
    """
    B, N, _ = anchors.shape
    valid = context_valid_mask(counts, context.shape[1])[None].expand(B, N, -1)  # (B, N, P)
    if not enabled:
        return valid.clone()
    cos = torch.einsum("bnd,npd->bnp", F.normalize(anchors, dim=-1), F.normalize(context, dim=-1))
    cos = cos.masked_fill(~valid, NEG_INF)
    k = min(top_k, context.shape[1])
    idx = cos.topk(k, dim=-1).indices  # (B, N, k)
    sel = torch.zeros_like(valid)
    sel.scatter_(-1, idx, True)
    return sel & valid


def neighbour_weights(logits: torch.Tensor, selected: torch.Tensor, positiveness: bool = True) -> torch.Tensor:
    """Normalised positiveness ŵ_i = w_i / sum_{k in topK} w_k (Claim 1; DESIGN.md, 'Reading the paper: positiveness').

    The global softmax denominator of Eq. (7) cancels, so ŵ is a softmax over the selected
    logits, masked (a dot-product softmax over all N_p underflows in
    float32; the softmax subtracts the row max first, so the differences stay exact).
    ``positiveness=False`` gives uniform 1/K weights (the literal Eq. 13).
    logits: (B, N, P); selected: (B, N, P) bool -> weights (B, N, P), zero off the selection,
    rows with no selection are all zero.
    """
    if not positiveness:
        w = selected.to(logits.dtype)
        return w / w.sum(-1, keepdim=True).clamp(min=1.0)
    w = torch.softmax(logits.masked_fill(~selected, NEG_INF), dim=-1)
    return torch.nan_to_num(w, nan=0.0) * selected.to(logits.dtype)


def prototype_aware_cam(z: torch.Tensor, weights: torch.Tensor, context: torch.Tensor,
                        labels: torch.Tensor, normalize: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """Eq. (13): M~_n(j) = ReLU( sum_{i in topK} ŵ_i cos(z(j), p_i) ) (DESIGN.md, 'Reading the paper:
    PACAM space' and 'positiveness').

    The pixel embedding is the projection z (the space of the prototypes). Because
    sum_i ŵ_i cos(z, p_i) = ẑ · sum_i ŵ_i p̂_i, the weighted unit prototypes are summed first:
    one (B, N, D) x (B, D, hw) product instead of P similarity maps.
    z: (B, D, h, w); weights: (B, N, P); context: (N, P, D) (constants: no gradient);
    labels: (B, N) -> PACAM (B, N, h, w), zero for absent classes. ``normalize`` divides each
    map by its max like Eq. (3).
    """
    unit_ctx = F.normalize(context.detach(), dim=-1)
    query = torch.einsum("bnp,npd->bnd", weights, unit_ctx)  # (B, N, D)
    return _similarity_maps(z, query, labels, normalize, eps)


def instance_cam(z: torch.Tensor, protos: torch.Tensor, labels: torch.Tensor, normalize: bool = False,
                 eps: float = 1e-5) -> torch.Tensor:
    """SIPE's IS-CAM (Chen et al., CVPR 2022): M~_n(j) = ReLU(cos(z(j), P^I_n)), each image's own
    instance prototypes in place of the context prototypes (``cpal.context = instance``).

    The prototypes keep their gradient (SIPE's do). z: (B, D, h, w); protos: (B, N, D) (Eq. 4);
    labels: (B, N) -> (B, N, h, w), zero for absent classes; ``normalize`` divides each map by its
    max (SIPE divides every IS-CAM channel by its max before its loss).
    """
    return _similarity_maps(z, F.normalize(protos, dim=-1), labels, normalize, eps)


def _similarity_maps(z: torch.Tensor, query: torch.Tensor, labels: torch.Tensor, normalize: bool,
                     eps: float) -> torch.Tensor:
    """ReLU(query_n · ẑ(j)), optionally max-normalised, zero for absent classes.
    z: (B, D, h, w); query: (B, N, D); labels: (B, N) -> (B, N, h, w)."""
    maps = F.relu(torch.einsum("bnd,bdhw->bnhw", query, F.normalize(z, dim=1)))
    if normalize:
        maps = maps / (maps.flatten(2).amax(2)[..., None, None] + eps)
    return maps * labels.to(maps.dtype)[..., None, None]
