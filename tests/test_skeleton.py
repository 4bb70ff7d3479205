"""The SIPE skeleton switches of CPAL (issue 28), each against values worked out by hand:
SIPE's hierarchical embedding (model.embedding), the background prototype (cpal.background),
the SIPE arm (cpal.context = instance), which map L_self moves (cpal.self_grad), the maps a
seed evaluation scores with their foreground share, and the no-model floors."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpal_ray.config import ConfigError, CPALConfig, ModelConfig, load_config
from cpal_ray.cpal import cpal_step, prototype_aware_cam_from_outputs, self_loss
from cpal_ray.cpal.aware import instance_cam
from cpal_ray.cpal.bank import PrototypeBank
from cpal_ray.cpal.cams import pacam_with_background, prototype_maps
from cpal_ray.inference.metrics import ConfusionMatrix, own_background_label
from cpal_ray.models import build_backbone, build_model, embed_dim
from cpal_ray.models.cam_net import SIDE_WIDTHS, CAMNet

pytestmark = pytest.mark.unit


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------------------------- background


def test_prototype_maps_append_the_background_as_class_n():
    cams = t([[[[0.2, 0.0]], [[0.9, 0.3]]]])  # (1, N=2, 1, 2)
    labels = t([[1.0, 1.0]])
    same, same_labels = prototype_maps(cams, labels, "one_minus_max")
    assert same is cams and same_labels is labels
    maps, labs = prototype_maps(cams, labels, "prototype")
    assert maps.shape == (1, 3, 1, 2) and torch.allclose(maps[0, 2], t([[0.1, 0.7]]))  # 1 - max, last
    assert labs.tolist() == [[1.0, 1.0, 1.0]]  # every image has background
    with pytest.raises(ValueError, match="background"):
        prototype_maps(cams, labels, "derived")


def test_pacam_background_is_its_own_map_or_one_minus_max():
    pacam = t([[[[0.5]], [[0.2]], [[0.9]]]])  # (1, C=3, 1, 1): 2 foreground + the background prototype's map
    own = pacam_with_background(pacam, 2, "prototype")
    assert own[0, :, 0, 0].tolist() == pytest.approx([0.9, 0.5, 0.2])  # background first, its own map
    derived = pacam_with_background(pacam[:, :2], 2, "one_minus_max")
    assert derived[0, :, 0, 0].tolist() == pytest.approx([0.5, 0.5, 0.2])  # 1 - max(0.5, 0.2)


def test_background_prototype_is_the_mean_where_mb_exceeds_tau_and_pushed_as_class_n():
    # One image, N = 1, 3 pixels: CAM peaks at pixel 0; M_b = 1 - M = [0, 0.8, 1.0] > tau = 0.5 at pixels 1, 2.
    raw = t([[[[1.0, 0.2, 0.0]]]])
    z = t([[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 3.0]]]])  # (1, D=2, 1, 3)
    cfg = CPALConfig(tau=0.5, background="prototype", normalize_bank=False, center="none", top_k=1, num_clusters=1)
    out = {"cams": raw, "logits": raw.mean((2, 3)), "z": z}
    res = cpal_step(out, t([[1.0]]), cfg)
    assert res["protos"].shape == (1, 2, 2) and res["proto_valid"].tolist() == [[True, True]]
    assert res["protos"][0, 0].tolist() == pytest.approx([1.0, 0.0])  # class 0: pixel 0 only (M = 1 > 0.5)
    assert res["protos"][0, 1].tolist() == pytest.approx([0.0, 2.0])  # background: mean of pixels 1 and 2


def test_background_channel_of_l_self_is_the_cosine_map_of_the_background_context():
    raw = t([[[[1.0, 0.2, 0.0]]]])
    z = t([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]])
    cfg = CPALConfig(tau=0.5, background="prototype", normalize_bank=False, center="none", top_k=1, num_clusters=1,
                     alignment=False)
    context, counts = t([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.tensor([1, 1])  # class 0 along x, background along y
    out = {"cams": raw, "logits": raw.mean((2, 3)), "z": z}
    res = cpal_step(out, t([[1.0]]), cfg, context, counts)
    cam = t([1.0, 0.2, 0.0]) / (1.0 + 1e-5)
    cos_x, cos_y = t([1.0, 0.0, 2 ** -0.5]), t([0.0, 1.0, 2 ** -0.5])
    want = (((1 - cam) - cos_y).abs() + (cam - cos_x).abs()) / 2  # mean over the N + 1 = 2 channels
    assert res["self"].item() == pytest.approx(want.mean().item(), rel=1e-4)  # and over the pixels
    assert res["self_images"].item() == 1


def test_old_bank_state_of_n_classes_is_refused_by_name():
    cfg = load_config("configs/synthetic_tiny.yaml")
    bank_cfg = cfg.replace(**{"cpal.background": "prototype"})
    assert bank_cfg.bank_classes == cfg.data.num_classes + 1
    old = PrototypeBank.from_config(cfg, 8)
    new = PrototypeBank.from_config(bank_cfg, 8)
    assert new.num_classes == cfg.data.num_classes + 1
    with pytest.raises(ValueError, match="bank state has shape"):
        new.load_state_dict(old.state_dict())


# ---------------------------------------------------------------------------------- SIPE arm


def test_instance_cam_is_relu_cosine_to_the_images_own_prototype_with_its_gradient():
    z = t([[[[1.0, 0.0, -1.0]], [[0.0, 1.0, 0.0]]]]).requires_grad_()  # (1, 2, 1, 3)
    protos = t([[[2.0, 0.0]]]).requires_grad_()  # (1, 1, 2)
    m = instance_cam(z, protos, t([[1.0]]))
    assert m[0, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.0])  # cos = 1, 0, -1 -> ReLU
    m.sum().backward()
    assert protos.grad is not None and z.grad is not None  # SIPE's prototypes keep their gradient
    assert instance_cam(z, protos, t([[0.0]])).abs().sum() == 0  # absent class: zero


def test_instance_context_trains_l_self_from_the_first_step_without_a_bank():
    raw = t([[[[1.0, 0.2, 0.0]]]])
    z = t([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]])
    cfg = CPALConfig(tau=0.5, context="instance", normalize_bank=False, center="none")
    out = {"cams": raw, "logits": raw.mean((2, 3)), "z": z}
    res = cpal_step(out, t([[1.0]]), cfg)  # no context: a bank run would be BCE only here
    assert res["protos"] is None and res["self_images"].item() == 1
    cam = t([1.0, 0.2, 0.0]) / (1.0 + 1e-5)
    is_cam = t([1.0, 0.0, 2 ** -0.5])  # own prototype = z at pixel 0 = (1, 0)
    want = (((1 - cam) - (1 - is_cam)).abs() + (cam - is_cam).abs()).mean() / 2
    assert res["self"].item() == pytest.approx(want.item(), rel=1e-4)
    inference = prototype_aware_cam_from_outputs(z, raw, t([[1.0]]), None, None, cfg)
    assert inference[0, 0, 0].tolist() == pytest.approx(is_cam.tolist(), abs=1e-5)


# ---------------------------------------------------------------------------------- self_grad


@pytest.mark.parametrize("grad, cam_moves, pacam_moves", [("both", True, True), ("cam", True, False),
                                                           ("pacam", False, True)])
def test_self_grad_chooses_which_map_l_self_moves(grad, cam_moves, pacam_moves):
    cam = t([[[[0.2, 0.9]], [[0.8, 0.1]]]]).requires_grad_()
    pacam = t([[[[0.6, 0.3]], [[0.4, 0.5]]]]).requires_grad_()
    self_loss(cam, pacam, grad=grad).backward()
    assert (cam.grad is not None and cam.grad.abs().sum() > 0) == cam_moves
    assert (pacam.grad is not None and pacam.grad.abs().sum() > 0) == pacam_moves


# ---------------------------------------------------------------------------------- hierarchical


def test_hierarchical_embedding_is_sipes_768_d_unit_parts_on_detached_stages():
    torch.manual_seed(0)
    model = CAMNet(build_backbone("tiny", width=8), num_classes=3, embedding="hierarchical", freeze_bn=False)
    assert model.embed_dim == sum(SIDE_WIDTHS) == 768
    assert embed_dim(ModelConfig(backbone="tiny", embedding="hierarchical")) == 768
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out["z"].shape == (2, 768, 4, 4) and out["cams"].shape == (2, 3, 4, 4)
    # The last stage's part is at the CAM grid already: every pixel of it has unit norm.
    last = out["z"][:, -SIDE_WIDTHS[-1]:]
    assert torch.allclose(last.norm(dim=1), torch.ones(2, 4, 4), atol=1e-3)
    # A loss on z alone trains the side convs and never reaches the backbone (stages detached).
    model.zero_grad()
    out["z"].pow(2).mul(torch.randn_like(out["z"])).sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projection.parameters())
    # The classifier path still trains the backbone.
    model.zero_grad()
    model(x)["logits"].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    new = {id(p) for g in model.param_groups() if g["name"] == "new_layers" for p in g["params"]}
    assert all(id(p) in new for p in model.projection.parameters())


def test_hierarchical_embedding_on_efficientnet_lite0():
    model = build_model(ModelConfig(backbone="efficientnet_lite0", pretrained=False, embedding="hierarchical"), 4)
    out = model(torch.randn(1, 3, 96, 96))
    assert out["z"].shape == (1, 768, 6, 6) and out["features"].shape[-2:] == (6, 6)


def test_new_switches_are_validated_by_name():
    for field, value in (("background", "derived"), ("context", "memory"), ("self_grad", "none"), ("region", "box")):
        with pytest.raises(ConfigError, match=f"cpal.{field}"):
            CPALConfig(**{field: value})
    with pytest.raises(ConfigError, match="model.embedding"):
        ModelConfig(embedding="mlp")
    assert not CPALConfig(context="instance").uses_bank and CPALConfig().uses_bank
    assert not CPALConfig(enabled=False).uses_bank


# ---------------------------------------------------------------------------------- scoring


def test_own_background_label_is_an_argmax_without_threshold():
    bg = t([[0.9, 0.1, 0.3]]).numpy()
    cams = t([[[0.5, 0.8, 0.3]], [[0.1, 0.9, 0.2]]]).numpy()  # classes 4 and 7, (K=2, 1, 3)
    label = own_background_label(bg, cams, np.array([4, 7]))
    assert label.tolist() == [[0, 8, 0]]  # bg wins pixel 0 and the tie at pixel 2


def test_confusion_matrix_reports_foreground_shares():
    cm = ConfusionMatrix(3).update(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 255]))
    res = cm.compute()
    assert res["fg_fraction"] == pytest.approx(2 / 3) and res["gt_fg_fraction"] == pytest.approx(1 / 3)


def _tiny_run(**over):
    from cpal_ray.engine import fit_local

    base = {"train.epochs": 2, "train.max_steps_per_epoch": 2, "train.log_every": 100, "dist.num_workers": 1,
            "cpal.warmup_cluster_steps": 1, "cpal.top_k": 2}
    base.update(over)
    cfg = load_config("configs/synthetic_tiny.yaml", base)
    return cfg, fit_local(cfg)


def test_sipe_skeleton_trains_with_an_n_plus_1_bank_and_scores_every_map():
    from cpal_ray.data import build_dataset
    from cpal_ray.inference.evaluate import evaluate_floors, evaluate_seeds

    cfg, out = _tiny_run(**{"model.embedding": "hierarchical", "cpal.background": "prototype", "cpal.center": "none"})
    n = cfg.data.num_classes
    assert out.bank.num_classes == n + 1 and out.bank.counts()[n] > 0  # the background row filled
    assert out.context.prototypes.shape[0] == n + 1 and out.history[-1]["self_images"] > 0
    ds = build_dataset(cfg.data, "train", train=False)
    res = evaluate_seeds(out.model, ds, cfg, context=out.context, max_images=4, scales=(1.0,), flip=False,
                         cam_source="cam")
    assert set(res["sources"]) == {"cam", "pacam", "pacam_argmax"}
    for r in res["sources"].values():
        assert 0.0 <= r["best_miou"] <= 1.0 and 0.0 <= r["fg_fraction"] <= 1.0
    floors = evaluate_floors(ds, max_images=4)
    assert floors["all_background"]["fg_fraction"] == 0.0 and floors["fill_first_class"]["fg_fraction"] == 1.0
    assert floors["all_background"]["miou"] < 1.0 and floors["images"] == 4


def test_sipe_arm_needs_no_bank_and_has_a_pacam():
    from cpal_ray.data import build_dataset
    from cpal_ray.inference.evaluate import evaluate_seeds

    cfg, out = _tiny_run(**{"cpal.context": "instance", "cpal.pacam_normalize": True})
    assert out.bank is None and out.context is None
    assert all(r["self_images"] > 0 for r in out.history)  # L_self from the first step: no cold start
    ds = build_dataset(cfg.data, "train", train=False)
    res = evaluate_seeds(out.model, ds, cfg, max_images=4, scales=(1.0,), flip=False, cam_source="pacam")
    assert set(res["sources"]) == {"cam", "pacam"} and res["cam_source"] == "pacam"


def test_sharded_bank_routes_the_background_row_and_equals_one_bank():
    from cpal_ray.cpal.shards import make_bank

    cfg = load_config("configs/synthetic_tiny.yaml", {"cpal.background": "prototype", "cpal.num_clusters": 2,
                                                      "cpal.top_k": 1, "cpal.bank_shards": 2})
    n = cfg.bank_classes
    one, sharded = make_bank(cfg.replace(**{"cpal.bank_shards": 1}), 4, prefer_gpu=False), make_bank(cfg, 4, False)
    rng = np.random.default_rng(0)
    for step in range(3):
        cls, vec = np.arange(n), rng.normal(size=(n, 4)).astype(np.float32)
        assert one.push(("e", step), cls, vec) and sharded.push(("e", step), cls, vec)
    a, b = one.cluster("epoch1"), sharded.cluster("epoch1")
    assert a.prototypes.shape[0] == n and torch.equal(a.counts, b.counts) and a.counts[n - 1] == 2
    assert torch.allclose(a.prototypes, b.prototypes)


def test_sipe_regions_give_each_pixel_one_class_by_correlation_iou():
    from cpal_ray.cpal.cams import sipe_regions

    # Pixels 0 and 1 share a direction, pixel 2 is orthogonal; CAM [1, .5, 0], background [0, .5, 1].
    z = t([[[[1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]]])
    cams = t([[[[1.0, 0.5, 0.0]]]])
    seeds = sipe_regions(z, cams, t([[1.0]]))
    # IoU fg: .75, .75, 0; background (halved): 1/12, 1/12, 1/3 -> pixel 1 is the class's, not both.
    assert seeds[0, :, 0].tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert sipe_regions(z, cams, t([[0.0]]))[0, 0].sum() == 0  # an absent class gets no pixel
    cfg = CPALConfig(region="sipe", background="prototype", normalize_bank=False, center="none")
    out = {"cams": cams, "logits": cams.mean((2, 3)), "z": z}
    res = cpal_step(out, t([[1.0]]), cfg)
    assert res["protos"][0].tolist() == [[1.0, 0.0], [0.0, 1.0]]  # class: mean of pixels 0, 1; background: pixel 2
    threshold = cpal_step(out, t([[1.0]]), dataclasses.replace(cfg, region="threshold", tau=0.1))
    assert threshold["protos"][0, 1].tolist() == pytest.approx([0.5, 0.5])  # M_b > tau takes pixels 1 and 2
