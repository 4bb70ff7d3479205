"""The PACAM diagnostics (cpal_ray/inference/diagnostics.py) on hand-made maps, and the embedding
centring switch (cpal.center) that removes the flat PACAM they expose."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpal_ray.config import ConfigError, CPALConfig
from cpal_ray.cpal import centered_embedding, cpal_step, prototype_aware_cam_from_outputs
from cpal_ray.cpal import Context
from cpal_ray.inference.diagnostics import MapContrast, contrast_report, embedding_cosine, training_maps

pytestmark = pytest.mark.unit

# One 2 x 4 image: class 0 (mask 1) on the left half, background on the right, one ignored pixel.
MASK = np.array([[1, 1, 0, 0], [1, 1, 0, 255]])
CAM = np.array([[[1.0, 0.6, 0.2, 0.0], [0.8, 0.4, 0.0, 0.9]]])   # (K=1, H, W)
FLAT = np.full((1, 2, 4), 0.6)


def test_contrast_of_a_sharp_and_a_flat_map():
    r = MapContrast().update(MASK, [0], cam=CAM, pacam=FLAT).compute()
    assert r["instances"] == 1
    assert r["cam"]["fg_mean"] == pytest.approx(0.7) and r["cam"]["bg_mean"] == pytest.approx(0.2 / 3)
    assert r["cam"]["ratio"] == pytest.approx(10.5)
    assert r["cam"]["above"] == pytest.approx(3 / 7)          # 1.0, 0.6, 0.8 of 7 labelled pixels
    assert r["cam"]["fg_above"] == pytest.approx(0.75) and r["cam"]["bg_above"] == 0
    assert r["pacam"]["ratio"] == pytest.approx(1.0) and r["pacam"]["above"] == 1.0
    assert r["pacam"]["bg_above"] == 1.0
    # agreement over the 7 labelled pixels: |diff| = .4 0 .4 .6 / .2 .2 .6 ; {cam>.5} = 3 px, {flat>.5} = 7 px
    assert r["cam_vs_pacam"]["l1"] == pytest.approx(2.4 / 7)
    assert r["cam_vs_pacam"]["iou"] == pytest.approx(3 / 7)


def test_contrast_edge_cases_and_merge():
    zero_bg = MapContrast().update(MASK, [0], cam=(MASK == 1)[None] * 1.0).compute()
    assert zero_bg["cam"]["ratio"] == math.inf and "cam_vs_pacam" not in zero_bg
    no_bg = MapContrast().update(np.ones((2, 2)), [0], cam=np.ones((1, 2, 2))).compute()
    assert math.isnan(no_bg["cam"]["ratio"]) and math.isnan(no_bg["cam"]["bg_mean"])
    with pytest.raises(ValueError, match="shape"):
        MapContrast().update(MASK, [0, 1], cam=CAM)
    # two classes in one image: class 1's pixels count as neither its fg nor background of class 0
    mask2 = np.array([[1, 2, 0, 0]])
    maps = np.array([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 1.0, 0.5, 0.0]]])
    r2 = MapContrast().update(mask2, [0, 1], cam=maps).compute()
    assert r2["cam"]["fg_mean"] == pytest.approx(1.0) and r2["cam"]["bg_mean"] == pytest.approx(0.125)
    both = MapContrast().update(MASK, [0], cam=CAM, pacam=FLAT).update(mask2, [0, 1], cam=maps, pacam=maps)
    a = MapContrast().update(MASK, [0], cam=CAM, pacam=FLAT)
    b = MapContrast().update(mask2, [0, 1], cam=torch.tensor(maps), pacam=torch.tensor(maps))
    merged, want = a.merge(b).compute(), both.compute()
    assert merged["instances"] == want["instances"] == 3
    for key in ("cam", "pacam", "cam_vs_pacam"):
        assert merged[key] == pytest.approx(want[key])


def test_embedding_cosine_parallel_orthogonal_and_opposite():
    parallel = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]).reshape(1, 2, 1, 3)   # all along e1
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)          # e1, e2
    opposite = torch.tensor([[1.0, -2.0], [0.0, 0.0]]).reshape(1, 2, 1, 2)           # e1, -e1
    got = embedding_cosine(torch.cat([parallel[..., :2], orthogonal, opposite]))
    assert torch.allclose(got, torch.tensor([1.0, 0.5, 0.0]), atol=1e-6)


def _offset_image():
    """z of one image (D=2, 1 x 4): a large common component (10, 0) plus +-1 along e2;
    object (CAM high) on the first two pixels."""
    z = torch.tensor([[10.0, 10.0, 10.0, 10.0], [1.0, 1.0, -1.0, -1.0]]).reshape(1, 2, 1, 4)
    cams = torch.tensor([5.0, 4.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    return z, cams, torch.ones(1, 1)


def test_centered_embedding_removes_each_images_mean():
    z = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0)) + 7.0
    c = centered_embedding(z, "image")
    assert torch.allclose(c.mean(dim=(2, 3)), torch.zeros(3, 4), atol=1e-5)
    assert torch.allclose(c[1], z[1] - z[1].mean(dim=(1, 2), keepdim=True))
    assert centered_embedding(z, "none") is z
    with pytest.raises(ValueError, match="centring"):
        centered_embedding(z, "batch")
    with pytest.raises(ConfigError, match="cpal.center"):
        CPALConfig(center="batch")


def test_common_component_makes_the_pacam_flat_and_centring_restores_it():
    """Eq. 13 with cosines of embeddings that share a large component: every pixel is close to
    the prototype (flat PACAM); centred, the background points away from it (DESIGN.md, 'Reading
    the paper: PACAM space')."""
    z, cams, labels = _offset_image()
    counts = torch.tensor([1])
    plain = CPALConfig(num_clusters=1, top_k=1, alignment=False, center="none")
    flat = prototype_aware_cam_from_outputs(z, cams, labels, torch.tensor([[[10.0, 1.0]]]), counts, plain)
    assert flat.min() > 0.97                       # cos((10, -1), (10, 1)) = 99 / 101
    centred = CPALConfig(num_clusters=1, top_k=1, alignment=False, center="image")
    sharp = prototype_aware_cam_from_outputs(z, cams, labels, torch.tensor([[[0.0, 1.0]]]), counts, centred)
    assert torch.allclose(sharp.flatten(), torch.tensor([1.0, 1.0, 0.0, 0.0]), atol=1e-5)


def test_cpal_step_pushes_prototypes_of_the_centred_embedding():
    z, cams, labels = _offset_image()
    out = {"z": z, "cams": cams, "logits": cams.mean((2, 3))}
    r = cpal_step(out, labels, CPALConfig(num_clusters=1, top_k=1, center="image", normalize_bank=False))
    assert torch.allclose(r["protos"][0, 0], torch.tensor([0.0, 1.0]))   # mean of the two object pixels, centred
    r0 = cpal_step(out, labels, CPALConfig(num_clusters=1, top_k=1, normalize_bank=False, center="none"))
    assert torch.allclose(r0["protos"][0, 0], torch.tensor([10.0, 1.0]))
    maps = training_maps(out, labels, CPALConfig(num_clusters=1, top_k=1, center="image"),
                         torch.tensor([[[0.0, 1.0]]]), torch.tensor([1]))
    assert set(maps) == {"cam", "pacam", "embedding"} and embedding_cosine(maps["embedding"]).item() < 1e-6


class _Model(torch.nn.Module):
    """Stand-in CAMNet: raw CAM of class 0 = red channel, z = (1 + red, 1 - red) on a 1/4 grid."""

    def forward(self, x):
        red = torch.nn.functional.avg_pool2d(x[:, :1], 4)
        cams = torch.cat([red * 4, -red], dim=1)
        return {"cams": cams, "z": torch.cat([1 + red, 1 - red], dim=1), "logits": cams.mean((2, 3))}


def test_contrast_report_runs_over_a_dataset():
    images, items = torch.zeros(3, 3, 8, 8), []
    for i in range(3):
        images[i, 0, :, :4] = 1.0                        # object on the left half
        mask = torch.zeros(8, 8, dtype=torch.long)
        mask[:, :4] = 1
        items.append({"image": images[i], "label": torch.tensor([1.0, 0.0]), "mask": mask})
    # class 0's prototype points where the centred object pixels (0.5, -0.5) do
    ctx = Context(torch.tensor([[[1.0, -1.0]], [[1.0, 0.0]]]), torch.tensor([1, 1]), 1)
    cfg = CPALConfig(num_clusters=1, top_k=1, center="image")
    r = contrast_report(_Model(), items, cfg, ctx, batch_size=2)
    assert r["instances"] == 3 and set(r) >= {"cam", "pacam", "cam_vs_pacam", "embedding_cosine"}
    assert r["cam"]["ratio"] > 2 and r["pacam"]["ratio"] > 2 and r["cam_vs_pacam"]["iou"] > 0.5
    assert r["embedding_cosine"] == pytest.approx(0.0, abs=1e-6)       # two centred directions, opposite
    only_cam = contrast_report(_Model(), items, cfg, None, max_images=2)
    assert only_cam["instances"] == 2 and "pacam" not in only_cam


def test_the_demo_report_says_what_cpal_did_from_its_diagnostics():
    from cpal_ray.pipeline.baseline_vs_cpal import diagnostic_note

    last = {"diag_cam_ratio": 3.27, "diag_pacam_ratio": 1.70, "diag_cam_miou": 0.181, "diag_pacam_miou": 0.173,
            "self": 0.013, "bce": 0.106, "self_image_share": 0.979}
    note = diagnostic_note(last)
    assert "contrast of 1.7 against the CAM's 3.3" in note and "17.3 against 18.1" in note
    assert note.endswith("toward a map no better than it.") and "98 %" in note
    assert diagnostic_note({**last, "diag_pacam_miou": 0.2}).endswith("toward a map better than it.")
    assert "not recorded" in diagnostic_note({"self": 0.01})
