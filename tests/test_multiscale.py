"""Multi-scale flip CAMs (cpal_ray.inference.multiscale) with a tiny fixed-weight fake CAMNet."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpal_ray.inference.multiscale import (batched_multiscale_cams, feature_size, multiscale_cams,
                                           naive_multiscale_cams, scaled_size)

pytestmark = pytest.mark.unit

N = 5
SCALES = (1.0, 0.5, 1.5, 2.0)


class FakeCAMNet(nn.Module):
    """conv3x3 -> BN -> ReLU -> 16x16 average pool (output stride 16) -> 1x1 classifier, fixed weights.

    Follows the CAMNet forward contract: {"features", "cams" (raw), "logits", "z"}.
    """

    def __init__(self, num_classes=N, dim=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.cls = nn.Conv2d(dim, num_classes, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)  # eval() must be used: batch statistics would mix images
        with torch.no_grad():
            for p in (self.conv.weight, self.conv.bias):
                p.copy_(torch.randn(p.shape, generator=g))
            # Mostly positive class weights on non-negative features: every class map has support.
            self.cls.weight.copy_(torch.rand(self.cls.weight.shape, generator=g) - 0.2)
            self.bn.running_mean.copy_(torch.randn(dim, generator=g) * 0.1)

    def forward(self, x):
        f = F.avg_pool2d(F.relu(self.bn(self.conv(x))), 16, 16, ceil_mode=True)
        raw = self.cls(f)
        return {"features": f, "cams": raw, "logits": raw.mean((2, 3)), "z": f}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FakeCAMNet()


def _image(h=48, w=64, seed=0):
    return torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))


def _label(*classes):
    lab = torch.zeros(N)
    lab[list(classes)] = 1
    return lab


def test_sizes():
    assert scaled_size((48, 64), 1.5) == (72, 96) and scaled_size((375, 500), 0.5) == (188, 250)
    assert scaled_size((3, 3), 0.1) == (1, 1)
    assert feature_size((375, 500)) == (24, 32) and feature_size((48, 64)) == (3, 4)


def test_result_shape_classes_and_normalisation(model):
    res = multiscale_cams(model, _image(), _label(1, 3), SCALES, flip=True)
    assert set(res) == {"classes", "cam"}
    assert res["classes"].dtype == np.int64 and res["classes"].tolist() == [1, 3]
    cam = res["cam"]
    assert cam.dtype == np.float32 and cam.shape == (2, 48, 64)
    assert cam.min() >= 0 and np.all(np.abs(cam.reshape(2, -1).max(1) - 1) < 1e-4)


def test_only_positive_classes_and_independent_of_others(model):
    img = _image(seed=1)
    everything = multiscale_cams(model, img, torch.ones(N), SCALES)
    some = multiscale_cams(model, img, _label(0, 4), SCALES)
    assert some["cam"].shape[0] == 2
    np.testing.assert_allclose(some["cam"], everything["cam"][[0, 4]], atol=1e-6)


def test_flip_equivariance(model):
    img = _image(seed=2)
    a = multiscale_cams(model, img, _label(0, 2), SCALES, flip=True)["cam"]
    b = multiscale_cams(model, img.flip(-1), _label(0, 2), SCALES, flip=True)["cam"]
    np.testing.assert_allclose(b, a[..., ::-1], atol=1e-5)


def test_single_scale_by_hand(model):
    img = _image(seed=3)
    with torch.no_grad():
        model.eval()
        raw = model(img[None])["cams"]
    m = F.relu(raw)[0, [1, 2]]
    up = F.interpolate(m[None], size=(48, 64), mode="bilinear", align_corners=False)[0]
    ref = up / (up.flatten(1).amax(1)[:, None, None] + 1e-5)
    res = multiscale_cams(model, img, _label(1, 2), scales=(1.0,), flip=False)
    np.testing.assert_allclose(res["cam"], ref.numpy(), atol=1e-6)


def test_batched_equals_naive_equals_plain(model):
    images = [_image(48, 64, 0), _image(40, 56, 1), _image(48, 64, 2), _image(48, 64, 3), _image(37, 50, 4)]
    labels = [_label(0, 1), _label(2), _label(1, 3, 4), _label(), _label(0)]
    for flip in (True, False):
        batched = batched_multiscale_cams(model, images, labels, SCALES, flip)
        chunked = batched_multiscale_cams(model, images, labels, SCALES, flip, max_batch=2)
        for img, lab, b, c in zip(images, labels, batched, chunked):
            plain = multiscale_cams(model, img, lab, SCALES, flip)
            naive = naive_multiscale_cams(model, img, lab, SCALES, flip)
            for other in (plain, naive, c):
                np.testing.assert_array_equal(other["classes"], b["classes"])
                assert other["cam"].shape == b["cam"].shape == (len(b["classes"]), *img.shape[1:])
                np.testing.assert_allclose(other["cam"], b["cam"], atol=1e-5)


def test_no_positive_class_and_mode_restored(model):
    model.train()
    res = multiscale_cams(model, _image(), _label(), SCALES)
    assert res["classes"].shape == (0,) and res["cam"].shape == (0, 48, 64)
    assert naive_multiscale_cams(model, _image(), _label(), SCALES)["cam"].shape == (0, 48, 64)
    multiscale_cams(model, _image(), _label(1), SCALES)
    assert model.training  # the caller's mode comes back
    model.eval()
    with pytest.raises(ValueError):
        batched_multiscale_cams(model, [_image()], [], SCALES)
    with pytest.raises(ValueError):
        batched_multiscale_cams(model, [torch.zeros(1, 8, 8)], [_label(1)], SCALES)


def test_pacam_branch_aggregates_like_the_cam(model):
    """With a PACAM function equal to ReLU(raw cams) the two outputs must coincide."""
    calls = []

    def fake_pacam(z, cams_raw, labels, context, counts, cfg):
        calls.append((tuple(z.shape), tuple(labels.shape), cfg))
        assert labels.shape[0] == z.shape[0] and context.shape == (N, 3, 8) and counts.shape == (N,)
        return F.relu(cams_raw)

    ctx, counts = torch.randn(N, 3, 8), torch.full((N,), 3)
    img, lab = _image(seed=5), _label(1, 4)
    res = multiscale_cams(model, img, lab, SCALES, True, ctx, counts, cpal_cfg="cfg", pacam_fn=fake_pacam)
    # one call per view (image and flip) per scale, each a batch of 1
    assert len(calls) == 2 * len(SCALES) and all(c[1] == (1, N) and c[2] == "cfg" for c in calls)
    np.testing.assert_array_equal(res["pacam"], res["cam"])
    naive = naive_multiscale_cams(model, img, lab, SCALES, True, ctx, counts, "cfg", pacam_fn=fake_pacam)
    np.testing.assert_allclose(naive["pacam"], res["pacam"], atol=1e-5)
    with pytest.raises(ValueError, match="cpal_cfg"):
        multiscale_cams(model, img, lab, SCALES, True, ctx, counts, None, pacam_fn=fake_pacam)


def test_pacam_with_the_real_cpal_function(model):
    from cpal_ray.config import CPALConfig

    ctx, counts = torch.randn(N, 10, 8), torch.tensor([10, 10, 0, 10, 4])
    cfg = CPALConfig(num_clusters=10, top_k=5)
    img, lab = _image(seed=6), _label(0, 2, 3)
    res = multiscale_cams(model, img, lab, SCALES, True, ctx, counts, cfg)
    naive = naive_multiscale_cams(model, img, lab, SCALES, True, ctx, counts, cfg)
    batched = batched_multiscale_cams(model, [_image(seed=9), img], [_label(1), lab], SCALES, True, ctx, counts, cfg)
    np.testing.assert_allclose(batched[1]["pacam"], res["pacam"], atol=1e-5)
    assert res["pacam"].shape == (3, 48, 64) and np.isfinite(res["pacam"]).all()
    assert res["pacam"][1].max() == 0  # class 2 has no context prototypes
    np.testing.assert_allclose(naive["pacam"], res["pacam"], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu_model = FakeCAMNet()
    gpu_model = FakeCAMNet().cuda()
    img, lab = _image(seed=7), _label(0, 3)
    a = multiscale_cams(cpu_model, img, lab, SCALES)["cam"]
    b = multiscale_cams(gpu_model, img, lab, SCALES)["cam"]
    np.testing.assert_allclose(a, b, atol=1e-4)
