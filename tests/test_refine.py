"""Tests of IRN's affinity maths (cpal_ray/refine/affinity.py): pairs against brute force, labels and
losses with hand-counted answers, walls in the boundary map, and the random walk's invariants."""
from __future__ import annotations

import math

import pytest
import torch

from cpal_ray.refine import (
    AffinityLabels,
    affinity_labels,
    affinity_loss,
    affinity_matrix,
    boundary_affinity,
    labels_from_walk,
    pair_indices,
    pair_offsets,
    path_points,
    propagate_cams,
    random_walk,
    transition_matrix,
)

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def one_thread():
    """The walks are hundreds of products with tiny matrices: 2 OpenMP threads on 2 shared, busy
    cores make each wait on the other (seconds instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_pairs(h: int, w: int, radius: int) -> set[frozenset[int]]:
    """Every unordered pair of distinct pixels of an (h, w) map with squared distance < radius^2."""
    pix = [(y, x) for y in range(h) for x in range(w)]
    return {frozenset((y1 * w + x1, y2 * w + x2)) for i, (y1, x1) in enumerate(pix) for (y2, x2) in pix[i + 1:]
            if (y1 - y2) ** 2 + (x1 - x2) ** 2 < radius ** 2}


def pair_of(src: torch.Tensor, dst: torch.Tensor, p: int, q: int) -> int:
    """Position of the unordered pair {p, q} in (src, dst)."""
    hit = ((src == p) & (dst == q)) | ((src == q) & (dst == p))
    assert int(hit.sum()) == 1
    return int(hit.nonzero()[0, 0])


# ---------------------------------------------------------------- pairs


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 10])
def test_pair_offsets_are_half_of_the_disc(radius):
    offs = [tuple(o) for o in pair_offsets(radius).tolist()]
    assert len(offs) == len(set(offs))
    assert (0, 0) not in offs
    assert all(dy * dy + dx * dx < radius * radius for dy, dx in offs)
    assert not any((-dy, -dx) in offs for dy, dx in offs)  # each unordered pair once
    disc = {(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
            if 0 < dy * dy + dx * dx < radius * radius}
    assert set(offs) | {(-dy, -dx) for dy, dx in offs} == disc


def test_pair_offsets_counts_match_irn():
    # IRN's search directions: 34 at its inference radius 5, 152 at its training radius 10.
    assert len(pair_offsets(5)) == 34
    assert len(pair_offsets(10)) == 152
    assert pair_offsets(1).shape == (0, 2)


@pytest.mark.parametrize("h,w,radius", [(5, 7, 3), (4, 4, 5), (1, 6, 2), (3, 2, 10), (6, 5, 1)])
def test_pair_indices_equal_brute_force(h, w, radius):
    src, dst = pair_indices(h, w, radius)
    assert src.shape == dst.shape and src.dtype == torch.int64
    assert bool(((src >= 0) & (dst >= 0) & (src < h * w) & (dst < h * w)).all())
    assert bool((dst > src).all())  # half-plane: the destination comes later in row-major order
    pairs = [frozenset(p) for p in zip(src.tolist(), dst.tolist())]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == brute_pairs(h, w, radius)


# ---------------------------------------------------------------- affinity labels

# 0 = background, 1 = a class, 255 = unknown. Pixels a b c / d e f (e unknown), radius 2 = the
# 8-neighbourhood: 11 pairs; 5 touch e; of the other 6: a-b, a-d, b-d bg; c-f fg; b-c, b-f neg.
SEEDS = torch.tensor([[0, 0, 1],
                      [0, 255, 1]])


def test_affinity_labels_hand_counted():
    src, dst = pair_indices(2, 3, 2)
    lab = affinity_labels(SEEDS, radius=2)
    assert isinstance(lab, AffinityLabels)
    assert src.numel() == 11
    assert (int(lab.bg_pos.sum()), int(lab.fg_pos.sum()), int(lab.neg.sum())) == (3, 1, 2)
    _, b, c, d, e, f = range(6)  # a = 0
    assert bool(lab.neg[pair_of(src, dst, b, c)]) and not lab.bg_pos[pair_of(src, dst, b, c)]
    assert bool(lab.fg_pos[pair_of(src, dst, c, f)])
    assert bool(lab.bg_pos[pair_of(src, dst, b, d)])  # diagonal
    touching = (src == e) | (dst == e)
    assert int(touching.sum()) == 5
    assert not bool((lab.bg_pos | lab.fg_pos | lab.neg)[touching].any())
    assert not bool((lab.bg_pos & lab.neg).any() | (lab.fg_pos & lab.neg).any() | (lab.bg_pos & lab.fg_pos).any())


def test_affinity_labels_two_classes_are_negative_and_batch_is_per_image():
    lab = affinity_labels(torch.tensor([[1, 2, 2]]), radius=2)
    assert lab.neg.tolist() == [True, False] and lab.fg_pos.tolist() == [False, True]
    assert not bool(lab.bg_pos.any())
    lab = affinity_labels(torch.tensor([[255, 255, 0]]), radius=2)  # two unknowns are not "the same class"
    assert not bool((lab.bg_pos | lab.fg_pos | lab.neg).any())
    batch = torch.stack([SEEDS, torch.tensor([[2, 2, 0], [255, 0, 0]])])
    lb = affinity_labels(batch, radius=2)
    for k in range(2):
        one = affinity_labels(batch[k], radius=2)
        for got, want in zip(lb, one):
            assert torch.equal(got[k], want)


# ---------------------------------------------------------------- boundary -> affinity


def test_path_points_include_both_ends_and_diagonal_corners():
    assert sorted(map(tuple, path_points(0, 3).tolist())) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert sorted(map(tuple, path_points(1, 1).tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for dy, dx in pair_offsets(5).tolist():
        pts = set(map(tuple, path_points(dy, dx).tolist()))
        assert {(0, 0), (dy, dx)} <= pts


def test_vertical_wall_cuts_affinity():
    h, w, wall, radius = 6, 9, 4, 4
    b = torch.zeros(h, w)
    b[:, wall] = 1.0
    src, dst = pair_indices(h, w, radius)
    aff = boundary_affinity(b, radius)
    assert aff.shape == src.shape
    cs, cd = src % w, dst % w
    same_side = ((cs < wall) & (cd < wall)) | ((cs > wall) & (cd > wall))
    assert bool((aff[same_side] == 1.0).all())
    assert bool((aff[~same_side] == 0.0).all())  # crossing, or touching the wall
    assert int((~same_side).sum()) > 0 and int(same_side.sum()) > 0


def test_diagonal_step_cannot_slip_between_corners():
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    src, dst = pair_indices(2, 2, 2)
    aff = boundary_affinity(b, 2)
    assert float(aff[pair_of(src, dst, 0, 3)]) == 0.0


def test_one_pixel_diagonal_wall_blocks_every_crossing_pair():
    h = w = radius = 7
    level = torch.arange(h)[:, None] + torch.arange(w)[None, :]  # y + x
    b = (level == 6).float()  # an 8-connected anti-diagonal wall
    src, dst = pair_indices(h, w, radius)
    aff = boundary_affinity(b, radius)
    ls, ld = level.flatten()[src], level.flatten()[dst]
    crossing = ((ls < 6) & (ld > 6)) | ((ls > 6) & (ld < 6))
    assert int(crossing.sum()) > 50 and bool((aff[crossing] == 0).all())
    # Corners are sampled too, so a same-side pair may touch the wall; one whose bounding box
    # stays on one side never does.
    ys, xs, yd, xd = src // w, src % w, dst // w, dst % w
    box_lo, box_hi = torch.minimum(ys, yd) + torch.minimum(xs, xd), torch.maximum(ys, yd) + torch.maximum(xs, xd)
    clear = (box_hi < 6) | (box_lo > 6)
    assert int(clear.sum()) > 50 and bool((aff[clear] == 1).all())


def test_boundary_affinity_is_one_minus_path_max_and_batches():
    b = torch.zeros(5, 5)
    b[2, 2] = 0.7
    src, dst = pair_indices(5, 5, 5)
    aff = boundary_affinity(b, 5)
    assert float(aff[pair_of(src, dst, 2 * 5 + 0, 2 * 5 + 4)]) == pytest.approx(0.3)  # straight through
    assert float(aff[pair_of(src, dst, 0, 4)]) == 1.0  # top row, away from the peak
    stack = torch.rand(3, 5, 5)
    batched = boundary_affinity(stack, 5)
    for k in range(3):
        assert torch.equal(batched[k], boundary_affinity(stack[k], 5))


# ---------------------------------------------------------------- loss


def test_loss_zero_for_perfect_large_for_inverted():
    lab = affinity_labels(SEEDS, radius=2)
    perfect = (lab.bg_pos | lab.fg_pos).float()  # 1 on positives, 0 on negatives (and ignored)
    good = affinity_loss(perfect, lab)
    assert set(good) == {"bg_pos", "fg_pos", "pos", "neg", "affinity"}
    assert all(abs(float(v)) < 1e-3 for v in good.values())
    bad = affinity_loss(1.0 - perfect, lab)
    assert float(bad["pos"]) > 10 and float(bad["neg"]) > 10 and float(bad["affinity"]) > 10


def test_loss_weights_bg_and_fg_halves_equally():
    # 3 bg pairs with -log a = 1, 1 fg pair with -log a = 3: pos = 1/2 + 3/2 = 2 (a pooled mean would be 1.5).
    lab = affinity_labels(SEEDS, radius=2)
    aff = torch.full(lab.neg.shape, 0.5, dtype=torch.float64)
    aff[lab.bg_pos] = math.exp(-1)
    aff[lab.fg_pos] = math.exp(-3)
    aff[lab.neg] = 1 - math.exp(-2)
    out = affinity_loss(aff, lab)
    assert float(out["bg_pos"]) == pytest.approx(1.0, abs=1e-3)
    assert float(out["fg_pos"]) == pytest.approx(3.0, abs=1e-3)
    assert float(out["pos"]) == pytest.approx(2.0, abs=1e-3)
    assert float(out["neg"]) == pytest.approx(2.0, abs=1e-3)
    assert float(out["affinity"]) == pytest.approx(2.0, abs=1e-3)
    empty = AffinityLabels(*(torch.zeros_like(lab.neg) for _ in range(3)))
    assert all(float(v) == 0.0 for v in affinity_loss(aff, empty).values())


def test_loss_gradient_reaches_boundary_and_descends():
    torch.manual_seed(0)
    seeds = torch.zeros(6, 8, dtype=torch.int64)
    seeds[:, 4:] = 1
    seeds[0, 0] = 255
    lab = affinity_labels(seeds, radius=3)
    logits = torch.randn(6, 8, requires_grad=True)
    loss = affinity_loss(boundary_affinity(torch.sigmoid(logits), 3), lab)["affinity"]
    loss.backward()
    grad = logits.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    with torch.no_grad():
        stepped = affinity_loss(boundary_affinity(torch.sigmoid(logits - 0.5 * grad / grad.abs().max()), 3), lab)
    assert float(stepped["affinity"]) < float(loss.detach())


# ---------------------------------------------------------------- random walk


def two_blocks(h: int = 4, w: int = 8, radius: int = 3, across: float = 0.05):
    """Pairs of an (h, w) map split into a left and a right block: affinity 1 within, ``across`` between."""
    src, dst = pair_indices(h, w, radius)
    left = (torch.arange(h * w) % w) < w // 2
    aff = torch.where(left[src] == left[dst], 1.0, across).double()
    return src, dst, aff, left.reshape(h, w)


def test_affinity_matrix_is_symmetric_powered_with_self_loops():
    src, dst = torch.tensor([0, 1]), torch.tensor([1, 2])
    a = affinity_matrix(torch.tensor([0.5, 0.9], dtype=torch.float64), src, dst, 4, beta=3.0).to_dense()
    want = torch.eye(4, dtype=torch.float64)
    want[0, 1] = want[1, 0] = 0.5 ** 3
    want[1, 2] = want[2, 1] = 0.9 ** 3
    assert torch.allclose(a, want)
    p = transition_matrix(a, "average")
    assert torch.allclose(p.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(transition_matrix(a, "mass"), p.t())
    assert torch.equal(transition_matrix(affinity_matrix(torch.tensor([0.5, 0.9], dtype=torch.float64), src, dst, 4,
                                                         beta=3.0), "average").to_dense(), p)


@pytest.mark.parametrize("mode", ["average", "mass"])
def test_walk_spreads_within_a_block_not_across_a_weak_edge(mode):
    src, dst, aff, left = two_blocks()
    maps = torch.zeros(2, 4, 8, dtype=torch.float64)
    maps[0, 0, 0] = 1.0  # left block
    maps[1, 3, 7] = 1.0  # right block
    out = random_walk(maps, transition_matrix(affinity_matrix(aff, src, dst, 32), mode), exp_times=8)
    assert float(out[0][left].min()) > 0.5 * float(out[0][left].mean())  # reached the far corner
    assert float(out[1][~left].min()) > 0.5 * float(out[1][~left].mean())
    assert float(out[0][~left].max()) < 1e-6 * float(out[0][left].max())
    assert float(out[1][left].max()) < 1e-6 * float(out[1][~left].max())
    # beta is what seals the edge: with beta = 1 an affinity of 0.05 leaks.
    leaky = random_walk(maps, transition_matrix(affinity_matrix(aff, src, dst, 32, beta=1.0), mode), exp_times=8)
    assert float(leaky[0][~left].max()) > 1e-2 * float(leaky[0][left].max())


def test_mass_walk_conserves_each_channel_sparse_and_dense():
    torch.manual_seed(1)
    src, dst = pair_indices(5, 6, 3)
    aff = torch.rand(src.numel(), dtype=torch.float64)
    a = affinity_matrix(aff, src, dst, 30, beta=2.0)
    maps = torch.rand(3, 5, 6, dtype=torch.float64)
    sparse = random_walk(maps, transition_matrix(a, "mass"), exp_times=5)
    dense = random_walk(maps, transition_matrix(a.to_dense(), "mass"), exp_times=5)
    assert torch.allclose(sparse.sum(dim=(1, 2)), maps.sum(dim=(1, 2)), rtol=1e-10)
    assert torch.allclose(sparse, dense, rtol=1e-10)
    assert not torch.allclose(sparse, maps)


def test_average_walk_keeps_constants_and_equals_irn_squaring():
    torch.manual_seed(2)
    src, dst = pair_indices(5, 5, 3)
    aff = torch.rand(src.numel(), dtype=torch.float64)
    a = affinity_matrix(aff, src, dst, 25, beta=3.0)
    p = transition_matrix(a, "average")
    assert torch.allclose(torch.sparse.sum(p, dim=1).to_dense(), torch.ones(25, dtype=torch.float64))
    const = torch.full((1, 5, 5), 0.3, dtype=torch.float64)
    assert torch.allclose(random_walk(const, p, exp_times=4), const)
    # IRN: T = A / A.sum(dim=0), squared exp_times times, applied as x (C, n) @ T.
    dense = a.to_dense()
    t = dense / dense.sum(dim=0, keepdim=True)
    for _ in range(4):
        t = t @ t
    maps = torch.rand(2, 5, 5, dtype=torch.float64)
    assert torch.allclose(random_walk(maps, p, exp_times=4), (maps.reshape(2, 25) @ t).reshape(2, 5, 5))


def test_walk_invariant_to_pair_order_and_direction():
    torch.manual_seed(3)
    src, dst = pair_indices(4, 5, 3)
    aff = torch.rand(src.numel(), dtype=torch.float64)
    perm = torch.randperm(src.numel())
    flip = torch.rand(src.numel()) < 0.5
    s2, d2 = torch.where(flip, dst, src)[perm], torch.where(flip, src, dst)[perm]
    maps = torch.rand(2, 4, 5, dtype=torch.float64)
    for mode in ("average", "mass"):
        one = random_walk(maps, transition_matrix(affinity_matrix(aff, src, dst, 20), mode), exp_times=3)
        two = random_walk(maps, transition_matrix(affinity_matrix(aff[perm], s2, d2, 20), mode), exp_times=3)
        assert torch.allclose(one, two, rtol=1e-12)


def test_propagate_cams_stops_at_a_wall_and_labels_follow():
    h, w = 6, 10
    boundary = torch.zeros(h, w)
    boundary[:, 5] = 1.0
    cams = torch.zeros(1, h, w)
    cams[0, 2:4, 1:3] = 1.0  # a CAM blob left of the wall
    cams[0, 0, 5] = 1.0  # and CAM on the wall, which IRN's (1 - B) damping removes
    walked = propagate_cams(cams, boundary)
    assert walked.shape == (1, h, w)
    assert float(walked[0, 0, 5]) == 0.0  # a wall pixel has no neighbours: it keeps its damped 0
    assert float(walked[0, :, :5].min()) > 0.1 * float(walked.max())
    assert float(walked[0, :, 5:].max()) < 1e-6 * float(walked.max())
    labels = labels_from_walk(walked, torch.tensor([6]))
    assert labels[:, :5].eq(7).all() and labels[:, 5:].eq(0).all()


def test_labels_from_walk_uses_one_global_max_and_image_classes():
    walked = torch.tensor([[[0.0, 0.3, 0.9, 0.1]],
                           [[0.1, 0.1, 0.3, 2.0]]])  # (K=2, 1, 4); global max 2.0
    # normalised: [0, .15, .45, .05] and [.05, .05, .15, 1]; pixel 1 would be fg with per-channel maxima.
    assert labels_from_walk(walked, torch.tensor([3, 7])).tolist() == [[0, 0, 4, 8]]
    assert labels_from_walk(walked, torch.tensor([3, 7]), bg_thres=0.5).tolist() == [[0, 0, 0, 8]]
    tie = torch.tensor([[[0.25, 1.0]]])
    assert labels_from_walk(tie, torch.tensor([0])).tolist() == [[0, 1]]  # background wins ties
    assert labels_from_walk(torch.zeros(0, 2, 3), torch.zeros(0)).eq(0).all()
    assert labels_from_walk(torch.zeros(1, 2, 3), torch.tensor([4])).eq(0).all()
