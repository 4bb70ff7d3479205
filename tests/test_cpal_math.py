"""Each CPAL equation against values worked out by hand on small tensors."""
import math

import pytest
import torch

from cpal_ray.config import CPALConfig
from cpal_ray.cpal import (background_map, classification_loss, cpal_step, feature_alignment, instance_prototypes,
                           neighbour_weights, normalized_cams, positiveness_logits, prototype_aware_cam,
                           prototype_aware_cam_from_outputs, select_neighbours, self_loss, with_background)

pytestmark = pytest.mark.unit


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_eq2_bce_matches_hand_value():
    logits, labels = t([[0.0, 2.0]]), t([[1.0, 0.0]])
    want = (-math.log(0.5) - math.log(1 - 1 / (1 + math.exp(-2.0)))) / 2
    assert classification_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)


def test_eq3_normalised_cam_relu_max_and_label_mask():
    raw = t([[[[-1.0, 2.0], [4.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]])  # (1, 2, 2, 2)
    m = normalized_cams(raw)
    assert torch.allclose(m[0, 0], t([[0.0, 0.5], [1.0, 0.0]]), atol=1e-5)
    assert torch.allclose(m[0, 1], torch.ones(2, 2), atol=1e-4)
    masked = normalized_cams(raw, t([[1.0, 0.0]]))
    assert masked[0, 1].abs().sum() == 0 and torch.allclose(masked[0, 0], m[0, 0])
    assert normalized_cams(-torch.ones(1, 1, 2, 2)).abs().sum() == 0  # all-zero map stays zero (eps)


def test_background_is_one_minus_max_and_goes_first():
    fg = t([[[[0.2, 0.0]], [[0.9, 0.3]]]])  # (1, 2, 1, 2)
    assert torch.allclose(background_map(fg), t([[[[0.1, 0.7]]]]))
    full = with_background(fg)
    assert full.shape == (1, 3, 1, 2) and torch.allclose(full[:, 0], t([[[0.1, 0.7]]]))


def test_eq4_masked_mean_uses_class_mask_area():
    z = t([[[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]]])  # (1, D=2, 1, 3)
    cams = t([[[[0.05, 0.5, 1.0]], [[0.0, 0.0, 0.0]], [[0.9, 0.9, 0.9]]]])  # (1, N=3, 1, 3)
    labels = t([[1.0, 1.0, 0.0]])
    protos, valid = instance_prototypes(z, cams, labels, tau=0.1)
    assert torch.allclose(protos[0, 0], t([2.5, 5.5]))
    assert valid.tolist() == [[True, False, False]]  # empty mask and absent class give no prototype
    assert protos[0, 1].abs().sum() == 0 and protos[0, 2].abs().sum() == 0
    unit, _ = instance_prototypes(z, cams, labels, tau=0.1, normalize=True)
    assert torch.allclose(unit[0, 0], t([2.5, 5.5]) / math.hypot(2.5, 5.5))
    assert unit[0, 1].abs().sum() == 0


def test_eq12_alignment_is_context_mean_minus_batch_instance_mean():
    anchors = t([[[2.0, 0.0], [9.0, 9.0]], [[0.0, 0.0], [1.0, 1.0]]])  # (B=2, N=2, D=2)
    valid = torch.tensor([[True, False], [True, True]])
    context = t([[[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]], [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])  # (N, P=3, D)
    counts = torch.tensor([2, 0])  # class 0: 2 valid rows (the third is padding); class 1 never seen
    delta = feature_alignment(anchors, valid, context, counts)
    assert torch.allclose(delta[0], t([0.5 - 1.0, 0.5 - 0.0]))
    assert delta[1].abs().sum() == 0


@pytest.mark.parametrize("metric,want", [
    ("dot", [1.0, 2.0, 3.0]),
    ("cosine", [1 / math.sqrt(5), 2 / math.sqrt(5), 3 / math.sqrt(10)]),
    ("l1", [-2.0, -2.0, -1.0]),
    ("l2", [-2.0, -math.sqrt(2), -1.0]),
])
def test_eq7_positiveness_metrics(metric, want):
    anchors = t([[[1.0, 2.0]]])
    context = t([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    got = positiveness_logits(anchors, context, metric)
    assert torch.allclose(got[0, 0], t(want), atol=1e-6)
    assert torch.allclose(positiveness_logits(anchors, context, metric, gamma=2.0), got / 2)


def test_eq6_topk_by_cosine_ignores_padding_and_scale():
    anchors = t([[[1.0, 0.0]]])
    context = t([[[1.0, 0.1], [0.0, 1.0], [5.0, -2.5], [1.0, 0.0]]])  # row 3 is padding (closest!)
    sel = select_neighbours(anchors, context, torch.tensor([3]), top_k=2)
    assert sel[0, 0].tolist() == [True, False, True, False]
    # A class with fewer prototypes than K keeps all of its valid rows.
    sel_small = select_neighbours(anchors, context, torch.tensor([1]), top_k=2)
    assert sel_small[0, 0].tolist() == [True, False, False, False]
    # Table 2 "no neighbour selection": every valid prototype.
    assert select_neighbours(anchors, context, torch.tensor([3]), 2, enabled=False)[0, 0].tolist() == [True, True, True, False]


def test_positiveness_cancels_inside_a_cosine():
    """Scaling each p_i by w_i > 0 changes neither the top-K of Eq. 6 nor the literal Eq. 13
    (cosines), which is why the weights must act on the similarity maps instead (DESIGN.md,
    'Reading the paper: positiveness')."""
    g = torch.Generator().manual_seed(5)
    anchors, context = torch.randn(2, 3, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    counts, labels = torch.tensor([5, 5, 5]), t([[1, 1, 0], [0, 1, 1]])
    scaled = context * (0.1 + torch.rand(3, 5, 1, generator=g) * 3)  # w_i p_i, w_i > 0
    sel = select_neighbours(anchors, context, counts, top_k=2)
    assert torch.equal(select_neighbours(anchors, scaled, counts, top_k=2), sel)
    z = torch.randn(2, 4, 3, 3, generator=g)
    uniform = neighbour_weights(torch.zeros(2, 3, 5), sel, positiveness=False)
    torch.testing.assert_close(prototype_aware_cam(z, uniform, scaled, labels),
                               prototype_aware_cam(z, uniform, context, labels))


def test_normalised_positiveness_is_softmax_over_selected():
    logits = t([[[1.0, 2.0, 3.0]]])
    sel = torch.tensor([[[True, False, True]]])
    w = neighbour_weights(logits, sel)
    e2 = math.exp(2.0)
    assert torch.allclose(w[0, 0], t([1 / (1 + e2), 0.0, e2 / (1 + e2)]))
    assert torch.allclose(neighbour_weights(logits, sel, positiveness=False)[0, 0], t([0.5, 0.0, 0.5]))
    # Large dot products neither underflow nor lose the selected winner.
    big = neighbour_weights(t([[[1000.0, 5000.0, 999.0]]]), sel)
    assert torch.allclose(big[0, 0], t([1 / (1 + math.exp(-1)), 0.0, math.exp(-1) / (1 + math.exp(-1))]))
    assert neighbour_weights(logits, torch.zeros_like(sel)).abs().sum() == 0


def test_eq13_pacam_weighted_cosines_relu_and_absent_classes():
    z = t([[[[1.0, 0.0, -2.0]], [[0.0, 3.0, 0.0]]]])  # pixels (1,0), (0,3), (-2,0): (B=1, D=2, 1, 3)
    context = t([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])  # (N=2, P=2, D)
    weights = t([[[0.75, 0.25], [0.5, 0.5]]])
    pacam = prototype_aware_cam(z, weights, context, t([[1.0, 0.0]]))
    assert torch.allclose(pacam[0, 0, 0], t([0.75, 0.25, 0.0]))
    assert pacam[0, 1].abs().sum() == 0
    # Uniform weights = the literal Eq. 13: ReLU(1/K sum_i cos(z, p_i)).
    lit = prototype_aware_cam(z, t([[[0.5, 0.5], [0.5, 0.5]]]), context, t([[1.0, 1.0]]))
    assert torch.allclose(lit[0, 0, 0], t([0.5, 0.5, 0.0]))
    normed = prototype_aware_cam(z, weights, context, t([[1.0, 0.0]]), normalize=True)
    assert normed[0, 0].max().item() == pytest.approx(1.0, abs=1e-4)


def test_eq14_self_loss_l1_over_n_plus_1_channels():
    cam = t([[[[1.0, 0.0]], [[0.5, 0.5]], [[0.0, 0.0]]]])  # (1, N+1=3, 1, 2)
    pacam = t([[[[0.0, 0.0]], [[0.5, 1.0]], [[0.0, 0.0]]]])
    # sum |diff| = 1 + 0.5 = 1.5 over 3 channels x 2 pixels -> 0.25
    assert self_loss(cam, pacam).item() == pytest.approx(0.25)
    both = torch.cat([cam, cam]), torch.cat([pacam, cam])
    assert self_loss(*both).item() == pytest.approx(0.125)
    assert self_loss(*both, include=torch.tensor([True, False])).item() == pytest.approx(0.25)


def _outputs(seed=0, B=2, N=3, D=4, h=4, w=4):
    g = torch.Generator().manual_seed(seed)
    cams = torch.randn(B, N, h, w, generator=g).requires_grad_()
    z = torch.randn(B, D, h, w, generator=g).requires_grad_()
    return {"cams": cams, "z": z, "logits": cams.mean((2, 3))}


def test_baseline_is_bce_only_and_pushes_nothing():
    out, labels = _outputs(), t([[1, 0, 1], [0, 1, 0]])
    r = cpal_step(out, labels, CPALConfig(enabled=False, num_clusters=4, top_k=2))
    assert r["protos"] is None and torch.equal(r["loss"], r["bce"])


def test_cold_start_is_bce_only_but_yields_prototypes():
    out, labels = _outputs(), t([[1, 0, 1], [0, 1, 0]])
    cfg = CPALConfig(num_clusters=4, top_k=2)
    r = cpal_step(out, labels, cfg, context=None)
    assert r["self"].item() == 0 and r["self_images"] == 0
    assert torch.allclose(r["loss"], r["bce"]) and r["proto_valid"].tolist() == [[True, False, True], [False, True, False]]
    empty = cpal_step(out, labels, cfg, torch.zeros(3, 4, 4), torch.zeros(3, dtype=torch.long))
    assert empty["self"].item() == 0


def test_unseen_class_excludes_its_image_and_gradients_flow():
    out, labels = _outputs(), t([[1, 0, 1], [0, 1, 0]])
    cfg = CPALConfig(num_clusters=4, top_k=2)
    context = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    counts = torch.tensor([4, 0, 2])  # class 1 never seen: image 1 cannot take part
    r = cpal_step(out, labels, cfg, context, counts)
    assert r["self_images"] == 1 and r["self"].item() > 0
    r["loss"].backward()
    assert out["z"].grad.abs().sum() > 0 and out["cams"].grad.abs().sum() > 0
    assert not r["protos"].requires_grad


def test_pacam_no_positiveness_equals_literal_eq13_mean_over_topk():
    out, labels = _outputs(seed=3), t([[1, 1, 0], [0, 1, 1]])
    cfg = CPALConfig(num_clusters=4, top_k=2, positiveness=False, alignment=False, normalize_bank=False,
                     center="none")
    context, counts = torch.randn(3, 4, 4), torch.tensor([4, 4, 4])
    pacam = prototype_aware_cam_from_outputs(out["z"], out["cams"], labels, context, counts, cfg)
    cams = normalized_cams(out["cams"], labels)
    anchors, _ = instance_prototypes(out["z"], cams, labels, cfg.tau)
    b, n = 0, 1
    cos_anchor = torch.cosine_similarity(anchors[b, n][None], context[n], dim=1)
    top = cos_anchor.topk(2).indices
    zpix = out["z"][b].flatten(1).T  # (hw, D)
    sims = torch.stack([torch.cosine_similarity(zpix, context[n, i][None], dim=1) for i in top]).mean(0)
    assert torch.allclose(pacam[b, n].flatten(), sims.clamp(min=0), atol=1e-5)
    assert pacam[0, 2].abs().sum() == 0  # absent class


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpal_step_and_backward_never_wait_for_the_gpu():
    """No host synchronisation in the CPAL terms or their backward (the bank push, one copy to the
    host per step, is the loop's only one): torch raises on any sync in "error" mode."""
    dev = torch.device("cuda")
    out, labels = _outputs(B=4, D=8, h=8, w=8), t([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]).to(dev)
    out = {k: v.detach().to(dev).requires_grad_() for k, v in out.items()}
    out["logits"] = out["cams"].mean((2, 3))
    cfg = CPALConfig(num_clusters=4, top_k=2)
    context = torch.randn(3, 4, 8, device=dev)
    counts = torch.tensor([4, 2, 4], device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = cpal_step(out, labels, cfg, context, counts)
        (r["loss"] + 0.0 * out["z"].sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(r["self_images"]) > 0 and out["z"].grad is not None
