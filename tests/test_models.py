"""Unit tests of cpal_ray.models: every registered backbone, CAMNet, the registry, weight files.

Inputs are tiny (64-80 px, batch 2) so ResNet-50 stays fast on CPU; only the EfficientNet
output-size check runs at 320 px.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cpal_ray.config import ConfigError, ModelConfig
from cpal_ray.models import (CAMNet, build_backbone, build_model, export_weights, list_backbones,
                             load_weights, register_backbone)
from cpal_ray.models import registry
from cpal_ray.models.backbones import EFFNET_OS16_LAYER, ResNet50, efficientnet_lite0_weights_path

N = 3  # foreground classes
NAMES = list_backbones()


def _model(name: str, proj_dim: int = 8, freeze_bn: bool = True) -> CAMNet:
    cfg = ModelConfig(backbone=name, pretrained=False, proj_dim=proj_dim, freeze_bn=freeze_bn, tiny_width=16)
    return build_model(cfg, num_classes=N)


def _images(b: int = 2, h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(0))


# --- registry ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_config_accepts_exactly_the_registered_backbones():
    for name in list_backbones():
        assert ModelConfig(backbone=name).backbone == name
    with pytest.raises(ConfigError, match="model.backbone"):
        ModelConfig(backbone="not_registered")


@pytest.mark.unit
def test_declared_channels_match_the_built_backbones():
    from cpal_ray.models import backbone_channels, embed_dim

    for name, kwargs in (("tiny", {"width": 12}), ("resnet50", {}), ("efficientnet_lite0", {})):
        assert backbone_channels(name, **kwargs) == build_backbone(name, **kwargs).out_channels
    assert embed_dim(ModelConfig(backbone="tiny", proj_dim=0, tiny_width=12)) == 12
    assert embed_dim(ModelConfig(backbone="resnet50", proj_dim=64)) == 64


@pytest.mark.unit
def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(name="tiny")(lambda **kw: nn.Identity())

    def resnet50():  # same function name as a registered factory
        return nn.Identity()

    with pytest.raises(ValueError, match="'resnet50' is already registered"):
        register_backbone(resnet50)


@pytest.mark.unit
def test_register_and_build_new_backbone():
    def _dummy_backbone(scale: int = 1):
        return nn.Conv2d(3, scale, 1)

    try:
        assert register_backbone(_dummy_backbone) is _dummy_backbone
        assert "_dummy_backbone" in list_backbones()
        assert build_backbone("_dummy_backbone", scale=2).out_channels == 2
    finally:
        registry._BACKBONES.pop("_dummy_backbone", None)
        registry._CHANNELS.pop("_dummy_backbone", None)


@pytest.mark.unit
def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'") as e:
        build_backbone("resnet18")
    for name in NAMES:
        assert name in str(e.value)


# --- backbones ---------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("name", NAMES)
def test_backbone_output_stride_16(name):
    net = build_backbone(name).eval()
    with torch.no_grad():
        f = net(_images(2, 64, 80))
        f_odd = net(_images(1, 65, 65))
    assert f.shape == (2, net.out_channels, 4, 5)
    assert f_odd.shape[-2:] == (5, 5)  # ceil(65 / 16)
    assert torch.isfinite(f).all()


@pytest.mark.unit
def test_efficientnet_output_size_at_320_and_only_block_11_changed():
    from efficientnet_lite_pytorch import EfficientNet

    net = build_backbone("efficientnet_lite0").eval()
    with torch.no_grad():
        f = net(torch.randn(1, 3, 320, 320))
    assert f.shape == (1, 1280, 20, 20)  # OS16 with exact SAME padding (static padding gives 19)

    ref = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ours = dict(net.net.named_modules())
    changed = []
    for name, m in ref.named_modules():
        if isinstance(m, nn.Conv2d):
            assert type(ours[name]) is type(m) and ours[name].weight.shape == m.weight.shape, name
            if tuple(ours[name].stride) != tuple(m.stride):
                changed.append((name, tuple(m.stride), tuple(ours[name].stride)))
    assert changed == [(EFFNET_OS16_LAYER, (2, 2), (1, 1))]
    assert tuple(net.net._conv_stem.stride) == (2, 2)
    assert set(ref.state_dict()) - set(net.net.state_dict()) == {"_fc.weight", "_fc.bias"}


@pytest.mark.unit
def test_efficientnet_pretrained_loads_shipped_weights():
    path = efficientnet_lite0_weights_path()
    ref = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(backbone="efficientnet_lite0", pretrained=True), num_classes=N)
    net = model.backbone.net
    keys = ("_conv_stem.weight", "_bn0.running_var", "_blocks.15._project_conv.weight", "_conv_head.weight")
    for key in keys:
        assert torch.equal(net.state_dict()[key], ref[key]), key
    random_init = build_backbone("efficientnet_lite0", pretrained=False)
    assert not torch.equal(random_init.net._conv_stem.weight, ref["_conv_stem.weight"])


@pytest.mark.unit
@pytest.mark.parametrize("layout", ["plain", "state_dict", "model"])
def test_resnet50_local_weights_round_trip(tmp_path, layout):
    torch.manual_seed(1)
    src = ResNet50()
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["module.fc.weight"], state["module.fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path / "r50.pth"
    torch.save(state if layout == "plain" else {layout: state, "epoch": 3}, path)

    torch.manual_seed(2)
    net = build_backbone("resnet50", pretrained=True, weights=str(path))
    assert torch.equal(net.layer4[2].conv3.weight, src.layer4[2].conv3.weight)
    assert torch.equal(net.bn1.running_mean, src.bn1.running_mean)


@pytest.mark.unit
def test_resnet50_pretrained_without_file_explains():
    with pytest.raises(ValueError, match="model.weights"):
        build_backbone("resnet50", pretrained=True)


@pytest.mark.unit
def test_missing_weights_file_names_path(tmp_path):
    path = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="nope/resnet50.pth"):
        build_backbone("resnet50", weights=str(path))
    with pytest.raises(FileNotFoundError, match="nope/resnet50.pth"):
        load_weights(_model("tiny"), path)


@pytest.mark.unit
def test_weight_file_key_problems_are_reported(tmp_path):
    state = build_backbone("tiny", width=16).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("body.4.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"weights missing from the file: \['body.4.0.weight'"):
        build_backbone("tiny", width=16, weights=str(tmp_path / "partial.pth"))

    torch.save({**state, "head.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.warns(UserWarning, match="unexpected keys.*head.weight"):
        build_backbone("tiny", width=16, weights=str(tmp_path / "extra.pth"))

    torch.save({k: v[:1] if v.ndim else v for k, v in state.items()}, tmp_path / "shape.pth")
    first = r"\['body.0.0.weight: file \(1, 3, 3, 3\) vs model \(8, 3, 3, 3\)'"
    with pytest.raises(ValueError, match=r"shape.pth: 25 size mismatches: " + first):
        build_backbone("tiny", width=16, weights=str(tmp_path / "shape.pth"))


# --- CAMNet ------------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("proj_dim", [8, 0])
@pytest.mark.parametrize("name", NAMES)
def test_forward_dict_shapes_and_logits(name, proj_dim):
    model = _model(name, proj_dim=proj_dim).eval()
    with torch.no_grad():
        out = model(_images())
        f = out["features"]
        c = model.in_channels
        assert f.shape == (2, c, 4, 4)
        assert out["cams"].shape == (2, N, 4, 4)
        assert out["logits"].shape == (2, N)
        assert out["z"].shape == (2, proj_dim or c, 4, 4)
        assert model.embed_dim == (proj_dim or c)
        for v in out.values():
            assert torch.isfinite(v).all()
        torch.testing.assert_close(out["logits"], out["cams"].mean(dim=(2, 3)))
        gap_then_classifier = model.classifier(f.mean(dim=(2, 3), keepdim=True)).flatten(1)
        torch.testing.assert_close(out["logits"], gap_then_classifier, rtol=1e-4, atol=1e-5)
        if proj_dim == 0:
            assert out["z"] is f


@pytest.mark.unit
@pytest.mark.parametrize("freeze_bn", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_trainable_param(name, freeze_bn):
    model = _model(name, freeze_bn=freeze_bn).train()
    norms = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]
    assert norms, "every backbone has BatchNorm layers"
    stats = [m.running_mean.clone() for m in norms]
    out = model(_images())
    (out["logits"].sum() + out["z"].sum()).backward()

    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), pname
        else:
            assert p.grad is None, pname
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.training and model.classifier.training
    for m, before in zip(norms, stats):
        assert m.training is not freeze_bn
        assert all(p.requires_grad is not freeze_bn for p in m.parameters())
        assert torch.equal(m.running_mean, before) is freeze_bn


@pytest.mark.unit
@pytest.mark.parametrize("freeze_bn", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_param_groups_partition_trainable_params(name, freeze_bn):
    model = _model(name, freeze_bn=freeze_bn)
    groups = model.param_groups(new_layer_lr_mult=10.0)
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    ids = [[id(p) for p in g["params"]] for g in groups]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids[0]) + len(ids[1]) == len(trainable)
    assert set(ids[0]) | set(ids[1]) == trainable
    assert set(ids[0]) == {id(p) for p in model.backbone.parameters() if p.requires_grad}
    new = [*model.classifier.parameters(), *model.projection.parameters()]
    assert set(ids[1]) == {id(p) for p in new}
    frozen = {id(p) for m in model.backbone.modules() if isinstance(m, _BatchNorm) for p in m.parameters()}
    assert frozen.isdisjoint(trainable) is freeze_bn
    torch.optim.SGD(groups, lr=0.1)  # the groups are valid optimiser input


@pytest.mark.unit
def test_build_model_uses_config():
    cfg = ModelConfig(backbone="tiny", tiny_width=12, proj_dim=0, freeze_bn=False)
    model = build_model(cfg, num_classes=5)
    assert model.in_channels == 12 and model.embed_dim == 12 and isinstance(model.projection, nn.Identity)
    assert model.classifier.weight.shape == (5, 12, 1, 1) and model.classifier.bias is None
    assert not model.freeze_bn


@pytest.mark.unit
def test_camnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        CAMNet(build_backbone("tiny"), num_classes=0)
    with pytest.raises(ValueError, match="out_channels"):
        CAMNet(nn.Identity(), num_classes=2)


# --- weight files ------------------------------------------------------------------------------

@pytest.mark.unit
def test_export_load_round_trip(tmp_path):
    torch.manual_seed(3)
    src = _model("tiny")
    with torch.no_grad():  # make BN statistics non-default so they are checked too
        for m in src.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.uniform_(-1, 1)
    path = export_weights(nn.DataParallel(src), tmp_path / "out" / "model.pth")
    state = torch.load(path, weights_only=True)
    assert type(state) is dict and all(isinstance(v, torch.Tensor) for v in state.values())
    assert set(state) == set(src.state_dict())  # no "module." prefix

    torch.manual_seed(4)
    dst = _model("tiny")
    assert load_weights(dst, path) is dst
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(_images())["cams"], src(_images())["cams"])


@pytest.mark.unit
def test_load_weights_is_strict(tmp_path):
    path = export_weights(_model("tiny", proj_dim=0), tmp_path / "m.pth")
    with pytest.raises(ValueError, match="m.pth: 4 weights missing.*projection"):
        load_weights(_model("tiny", proj_dim=8), path)  # the file has no projection head
    torch.save({**torch.load(path, weights_only=True), "extra": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="unexpected keys.*extra"):
        load_weights(_model("tiny", proj_dim=0), path)
