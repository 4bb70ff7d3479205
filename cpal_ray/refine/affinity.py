"""IRN's inter-pixel affinities and random walk (Ahn, Cho, Kwak, CVPR 2019), pure torch.

Pixel pairs. Two pixels i, j of an (H, W) map form a pair when their displacement d = j - i
satisfies |d|^2 < radius^2 (strictly). Only the half-plane d = (dy, dx) with dy > 0, or dy = 0 and
dx > 0, is kept, so each unordered pair appears once; i is the "source", j = i + d the
"destination", both flat row-major indices into H * W. Every function below that returns one value
per pair uses the same order (offset-major, then row-major over sources), so their outputs line up.

Affinity from a class boundary map B (H, W) in [0, 1]: a_ij = 1 - max_{k on path(i, j)} B(k).
The path is sampled as in IRN's path index: the integer points (y, x) of the bounding box of i and
j whose squared perpendicular distance to the straight line through i and j is < 1 (both ends
included; a diagonal step also visits its two corner neighbours, so a pair cannot slip through a
one-pixel diagonal wall). Pairs are formed only inside the image, so every path point is inside too.

Random walk (semantic segmentation, IRN's ``propagate_to_edge`` and ``make_sem_seg_labels``):
A = a^beta over the pairs, made symmetric, with self-loops of 1; a transition matrix from A; the
foreground CAMs, damped by (1 - B), are walked 2^exp_times steps. IRN walks the foreground
channels only: there is no background map in the walk (neither 1 - max fg nor any other). After
the walk (and IRN's x4 upsampling), all maps are divided by their common maximum and a constant
background channel of value ``sem_seg_bg_thres`` is put in front before the argmax
(``labels_from_walk``). IRN's seeds (step/cam_to_ir_label.py, here ``irn_pseudo_label``) likewise
use constant background scores (0.30 and 0.05), not 1 - max fg.

Letters: H x W a map, n = H * W its pixels, K the pairs, C channels.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

IRN_TRAIN_RADIUS = 10  # step/train_irn.py: PathIndex(radius=10) for the affinity labels and the loss
IRN_RADIUS = 5  # step/make_sem_seg_labels.py: propagate_to_edge(..., radius=5) for the random walk
IRN_BETA = 10  # run_sample.py: --beta default 10, the exponent on the affinities
IRN_EXP_TIMES = 8  # run_sample.py: --exp_times default 8, i.e. 2**8 = 256 walk steps
IRN_SEM_SEG_BG_THRES = 0.25  # run_sample.py: --sem_seg_bg_thres default 0.25
IRN_FEATURE_STRIDE = 4  # net/resnet50_irn.py: EdgeDisplacement(stride=4); seeds rescaled by 0.25 in voc12/dataloader.py
IRN_EPS = 1e-5  # net/resnet50_irn.py, step/train_irn.py: 1e-5 inside the logs and the loss denominators
IGNORE = 255  # unknown seed pixels (step/cam_to_ir_label.py writes 255 where fg and bg seeds disagree)


class AffinityLabels(NamedTuple):
    """Per-pair boolean masks, each (..., K); a pair touching an unknown pixel is in none."""

    bg_pos: torch.Tensor  # both background
    fg_pos: torch.Tensor  # the same foreground class
    neg: torch.Tensor  # different labels


def pair_offsets(radius: int) -> torch.Tensor:
    """The displacements (dy, dx) of the pairs within ``radius``, one per unordered pair.

    Kept: dy^2 + dx^2 < radius^2, and dy > 0 or (dy == 0 and dx > 0) (a half-plane: never (0, 0),
    never both d and -d). Returns (P, 2) int64, sorted by (dy, dx). radius 5 gives 34, 10 gives 152 (as IRN).
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    r = int(radius)
    offs = [(dy, dx) for dy in range(r) for dx in range(-r + 1, r)
            if dy * dy + dx * dx < r * r and (dy > 0 or dx > 0)]
    return torch.tensor(offs, dtype=torch.int64).reshape(-1, 2)


def _source_window(height: int, width: int, dy: int, dx: int) -> tuple[int, int, int]:
    """For offset (dy, dx) with dy >= 0: the sources whose destination is inside an (H, W) map
    are rows [0, ny) and columns [x0, x0 + nx). Returns (x0, ny, nx); ny or nx may be <= 0."""
    return max(0, -dx), height - dy, width - abs(dx)


def pair_indices(height: int, width: int, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (src, dst) of every pixel pair within ``radius`` lying inside an (H, W) map.

    Unlike IRN's training path index, which drops sources within radius - 1 of the left, right and
    bottom borders, every in-image pair is kept (IRN's inference pads B with 1 and crops, which
    amounts to the same set). Returns src (K,), dst (K,) int64 in [0, H * W), dst = src + dy * W + dx.
    """
    src, dst = [], []
    grid = torch.arange(height * width, dtype=torch.int64).reshape(height, width)
    for dy, dx in pair_offsets(radius).tolist():
        x0, ny, nx = _source_window(height, width, dy, dx)
        if ny <= 0 or nx <= 0:
            continue
        s = grid[:ny, x0:x0 + nx].reshape(-1)
        src.append(s)
        dst.append(s + dy * width + dx)
    if not src:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    return torch.cat(src), torch.cat(dst)


def affinity_labels(seeds: torch.Tensor, radius: int = IRN_TRAIN_RADIUS, ignore_index: int = IGNORE) -> AffinityLabels:
    """IRN's affinity labels from a seed map (``GetAffinityLabelFromIndices``).

    seeds: (..., H, W) int, 0 = background, other values = classes (ids or indices), ``ignore_index``
    = unknown. For each pair of ``pair_indices(H, W, radius)``: bg_pos if both are background,
    fg_pos if both are the same foreground class, neg if the labels differ; a pair with an unknown
    end is in none. Returns AffinityLabels of (..., K) bool masks.
    """
    if seeds.dim() < 2:
        raise ValueError(f"seeds must be (..., H, W), got {tuple(seeds.shape)}")
    src, dst = pair_indices(seeds.shape[-2], seeds.shape[-1], radius)
    flat = seeds.flatten(-2).to(torch.int64)
    a, b = flat[..., src.to(flat.device)], flat[..., dst.to(flat.device)]
    known = (a != ignore_index) & (b != ignore_index)
    same = (a == b) & known
    return AffinityLabels(bg_pos=same & (a == 0), fg_pos=same & (a != 0), neg=(a != b) & known)


def path_points(dy: int, dx: int) -> torch.Tensor:
    """The pixels IRN samples on the straight path from (0, 0) to (dy, dx).

    The integer points (y, x) in the bounding box of the two ends whose squared distance to the
    line through them is < 1: (dy * x - dx * y)^2 < dy^2 + dx^2 (exact in integers). Both ends are
    included. Returns (L, 2) int64 of (y, x) offsets from the source.
    """
    if dy == 0 and dx == 0:
        raise ValueError("a path needs two distinct pixels")
    norm2 = dy * dy + dx * dx
    pts = [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
           if (dy * x - dx * y) ** 2 < norm2]
    return torch.tensor(pts, dtype=torch.int64)


def boundary_affinity(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """a_ij = 1 - max of the boundary map over ``path_points`` of each pair (IRN's ``to_affinity``).

    boundary: (..., H, W) in [0, 1] (IRN: sigmoid of the edge branch). Returns (..., K) in the
    order of ``pair_indices(H, W, radius)``; differentiable (the max passes the gradient to the
    path's peak).
    """
    if boundary.dim() < 2:
        raise ValueError(f"boundary must be (..., H, W), got {tuple(boundary.shape)}")
    height, width = boundary.shape[-2:]
    out = []
    for dy, dx in pair_offsets(radius).tolist():
        x0, ny, nx = _source_window(height, width, dy, dx)
        if ny <= 0 or nx <= 0:
            continue
        windows = [boundary[..., py:py + ny, x0 + px:x0 + px + nx] for py, px in path_points(dy, dx).tolist()]
        peak = torch.stack(windows, dim=0).amax(dim=0)  # (..., ny, nx)
        out.append(1.0 - peak.flatten(-2))
    if not out:
        return boundary.new_zeros(boundary.shape[:-2] + (0,))
    return torch.cat(out, dim=-1)


def affinity_loss(aff: torch.Tensor, labels: AffinityLabels, eps: float = IRN_EPS) -> dict[str, torch.Tensor]:
    """IRN's affinity loss (``AffinityDisplacementLoss`` + ``train_irn.py``), displacement part aside.

    aff: (..., K) affinities in [0, 1]; labels: masks of the same shape. Means are sums over every
    pair of the batch divided by (count + eps), so an empty set gives 0:
      bg_pos = mean over bg_pos of -log(a + eps);  fg_pos = same over fg_pos;
      pos = bg_pos / 2 + fg_pos / 2;  neg = mean over neg of -log(1 + eps - a);
      affinity = (pos + neg) / 2 (the affinity half of IRN's total loss).
    Returns {"bg_pos", "fg_pos", "pos", "neg", "affinity"}: scalars.
    """
    pos_term = -torch.log(aff + eps)
    neg_term = -torch.log(1.0 + eps - aff)

    def masked_mean(term: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(term.dtype)
        return (term * m).sum() / (m.sum() + eps)

    bg_pos = masked_mean(pos_term, labels.bg_pos)
    fg_pos = masked_mean(pos_term, labels.fg_pos)
    pos = bg_pos / 2 + fg_pos / 2
    neg = masked_mean(neg_term, labels.neg)
    return {"bg_pos": bg_pos, "fg_pos": fg_pos, "pos": pos, "neg": neg, "affinity": (pos + neg) / 2}


def affinity_matrix(aff: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n: int,
                    beta: float = IRN_BETA) -> torch.Tensor:
    """The symmetric walk weights A: A_ij = A_ji = a_ij^beta for each pair, A_ii = 1.

    aff: (K,) in [0, 1]; src, dst: (K,) flat indices in [0, n), i != j, each unordered pair once.
    Returns a coalesced sparse COO (n, n) tensor (``.to_dense()`` for IRN's dense matrix); its
    entries do not depend on the order of the pairs or on which end is the source.
    """
    if not (aff.shape == src.shape == dst.shape) or aff.dim() != 1:
        raise ValueError(f"aff, src, dst must be (K,) alike, got {tuple(aff.shape)}, {tuple(src.shape)}, "
                         f"{tuple(dst.shape)}")
    weights = aff.clamp(min=0.0) ** beta
    diag = torch.arange(n, dtype=torch.int64, device=aff.device)
    rows = torch.cat([src.to(aff.device), dst.to(aff.device), diag])
    cols = torch.cat([dst.to(aff.device), src.to(aff.device), diag])
    vals = torch.cat([weights, weights, torch.ones(n, dtype=aff.dtype, device=aff.device)])
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=True).coalesce()


def transition_matrix(affinity: torch.Tensor, mode: str = "average") -> torch.Tensor:
    """The one-step operator P of the walk, x <- P @ x with x (n, C), from A (n, n) dense or sparse.

    "average" (IRN): P = D^-1 A, rows sum to 1; each step replaces a pixel's score by the
    A-weighted mean of its neighbours' (IRN's ``A / A.sum(dim=0)`` applied as ``x @ T`` with x
    (C, n) is this same operator). Constants stay constant; total mass is NOT kept.
    "mass": P = A D^-1, columns sum to 1; each pixel hands its score out to its neighbours, so
    every channel's sum over pixels is kept. Both leave unconnected regions unconnected.
    Returns P with A's layout (sparse COO or dense).
    """
    if mode not in ("average", "mass"):
        raise ValueError(f"unknown walk mode {mode!r}; choose 'average' (IRN) or 'mass'")
    axis = 1 if mode == "average" else 0  # the axis summed: rows for "average", columns for "mass"
    if affinity.is_sparse:
        a = affinity.coalesce()
        idx, vals = a.indices(), a.values()
        deg = torch.zeros(a.shape[0], dtype=vals.dtype, device=vals.device).index_add_(0, idx[1 - axis], vals)
        return torch.sparse_coo_tensor(idx, vals / deg[idx[1 - axis]], a.shape, check_invariants=False).coalesce()
    return affinity / affinity.sum(dim=axis, keepdim=True)


def random_walk(maps: torch.Tensor, transition: torch.Tensor, exp_times: int = IRN_EXP_TIMES) -> torch.Tensor:
    """Apply P to every channel 2**exp_times times (IRN: T squared exp_times times).

    maps: (C, H, W); transition: (n, n) with n = H * W, sparse or dense (``transition_matrix``).
    Iterating x <- P @ x costs 2^e products with a (n, C) matrix, where IRN's repeated squaring
    costs e products of (n, n) matrices; the result is the same up to rounding. Returns (C, H, W).
    """
    c, height, width = maps.shape
    n = height * width
    if transition.shape != (n, n):
        raise ValueError(f"transition must be ({n}, {n}) for maps {tuple(maps.shape)}, got {tuple(transition.shape)}")
    if transition.layout == torch.sparse_coo:
        with warnings.catch_warnings():  # torch flags CSR as "beta"; its products are ~7x faster than COO's
            warnings.simplefilter("ignore", UserWarning)
            transition = transition.to_sparse_csr()
    x = maps.reshape(c, n).t().to(transition.dtype)  # (n, C)
    for _ in range(2 ** exp_times):
        x = transition @ x
    return x.t().reshape(c, height, width).to(maps.dtype)


def pair_walk(maps: torch.Tensor, aff: torch.Tensor, radius: int, beta: float = IRN_BETA,
              exp_times: int = IRN_EXP_TIMES, mode: str = "average") -> torch.Tensor:
    """The same walk as ``random_walk(maps, transition_matrix(affinity_matrix(aff, ...), mode))``,
    with P built directly in CSR form instead of through a sorted COO matrix.

    Every pixel gets one slot per displacement within ``radius`` (both signs) and one for itself,
    in increasing flat offset, so the column indices of each row come out sorted with no sort; a
    slot whose neighbour is outside the map holds a weight of 0 (its column clamped into range).
    maps: (C, H, W); aff: (K,) affinities in ``pair_indices(H, W, radius)`` order (as
    ``boundary_affinity`` returns them). Returns (C, H, W).
    """
    if mode not in ("average", "mass"):
        raise ValueError(f"unknown walk mode {mode!r}; choose 'average' (IRN) or 'mass'")
    c, height, width = maps.shape
    n, dtype, device = height * width, aff.dtype, aff.device
    half = [tuple(d) for d in pair_offsets(radius).tolist()]
    offsets = sorted([(-dy, -dx) for dy, dx in half] + [(0, 0)] + half, key=lambda d: d[0] * width + d[1])
    weights = {(0, 0): torch.ones(height, width, dtype=dtype, device=device)}
    start = 0
    for dy, dx in half:
        x0, ny, nx = _source_window(height, width, dy, dx)
        fwd = torch.zeros(height, width, dtype=dtype, device=device)  # at the source i: weight of (i, i + d)
        back = torch.zeros(height, width, dtype=dtype, device=device)  # at the destination j: weight of (j, j - d)
        if ny > 0 and nx > 0:
            w = aff[start:start + ny * nx].clamp(min=0.0).reshape(ny, nx) ** beta
            fwd[:ny, x0:x0 + nx] = w
            back[dy:dy + ny, x0 + dx:x0 + dx + nx] = w
            start += ny * nx
        weights[(dy, dx)], weights[(-dy, -dx)] = fwd, back
    if start != aff.shape[-1]:
        raise ValueError(f"aff has {aff.shape[-1]} pairs, an ({height}, {width}) map has {start} within radius {radius}")
    vals = torch.stack([weights[d].reshape(n) for d in offsets], dim=1)  # (n, S): row i, slot s
    flat = torch.tensor([dy * width + dx for dy, dx in offsets], dtype=torch.int64, device=device)
    cols = (torch.arange(n, device=device)[:, None] + flat[None, :]).clamp(0, n - 1)
    deg = vals.sum(dim=1)  # A is symmetric: row sums = column sums
    vals = vals / (deg[:, None] if mode == "average" else deg[cols])
    crow = torch.arange(0, n * len(offsets) + 1, len(offsets), dtype=torch.int64, device=device)
    with warnings.catch_warnings():  # torch flags CSR as "beta"
        warnings.simplefilter("ignore", UserWarning)
        trans = torch.sparse_csr_tensor(crow, cols.reshape(-1), vals.reshape(-1), (n, n))
    return random_walk(maps, trans, exp_times)


def propagate_cams(cams: torch.Tensor, boundary: torch.Tensor, radius: int = IRN_RADIUS, beta: float = IRN_BETA,
                   exp_times: int = IRN_EXP_TIMES, mode: str = "average") -> torch.Tensor:
    """IRN's ``propagate_to_edge``: walk the CAMs over the affinities of a boundary map.

    cams: (K, h, w) the image's foreground CAMs (IRN: stride-4 CAMs of its positive classes, each
    divided by its max); boundary: (h, w) in [0, 1]. The CAMs are multiplied by (1 - B) first, as
    IRN does, then walked on ``transition_matrix(affinity_matrix(a, ..., beta), mode)`` (computed
    by ``pair_walk``, which gives the same maps without the matrix). Returns (K, h, w).
    """
    height, width = cams.shape[-2:]
    if boundary.shape != (height, width):
        raise ValueError(f"boundary shape {tuple(boundary.shape)} != cams size {(height, width)}")
    return pair_walk(cams * (1.0 - boundary), boundary_affinity(boundary, radius), radius, beta, exp_times, mode)


def labels_from_walk(walked: torch.Tensor, classes: torch.Tensor,
                     bg_thres: float = IRN_SEM_SEG_BG_THRES) -> torch.Tensor:
    """IRN's semantic label map from walked CAMs (``make_sem_seg_labels``).

    walked: (K, H, W) walked maps of the image's positive classes (IRN upsamples them x4 to the
    image first); classes: (K,) their foreground indices in 0..N-1 (the image labels). All maps
    are divided by their common max, a constant background channel ``bg_thres`` goes first,
    and the argmax (background wins ties) is mapped through keys = [0, classes + 1].
    Returns (H, W) int64 class ids in {0..N}; with K = 0 or all-zero maps, all background.
    """
    classes = torch.as_tensor(classes, dtype=torch.int64, device=walked.device).reshape(-1)
    if walked.dim() != 3 or walked.shape[0] != classes.shape[0]:
        raise ValueError(f"walked must be (K={classes.shape[0]}, H, W), got {tuple(walked.shape)}")
    if walked.shape[0] == 0:
        return torch.zeros(walked.shape[1:], dtype=torch.int64, device=walked.device)
    peak = walked.max().clamp(min=torch.finfo(walked.dtype).tiny)
    bg = torch.full((1,) + tuple(walked.shape[1:]), bg_thres, dtype=walked.dtype, device=walked.device)
    keys = torch.cat([classes.new_zeros(1), classes + 1])
    return keys[torch.cat([bg, walked / peak]).argmax(dim=0)]
