"""Tests of the attribute benchmark (cpal_ray/data/attributes.py): determinism, exact masks, the
attribute structure the dataset promises, and its speed."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cpal_ray.config import ConfigError, DataConfig, load_config
from cpal_ray.data import AttributeShapes, build_dataset, class_names
from cpal_ray.data.attributes import (SIGNATURE_PROB, background_appearances, class_attributes, object_slots,
                                      partner)

pytestmark = pytest.mark.unit


def _stats(ds: AttributeShapes) -> dict:
    """Per (image, class) instance: signature shown, share of non-signature pixels; per
    appearance: the classes whose pixels show it."""
    n, a = ds.num_classes, ds.attributes_per_class
    sig_shown, rare_share, shown_by = [], [], {}
    for i in range(len(ds)):
        _, mask, label, parts = ds._render(i)
        for c in np.flatnonzero(label):
            ids = parts[mask == c + 1]
            assert set(np.unique(ids).tolist()) <= set(class_attributes(int(c), n, a))
            sig_shown.append(bool((ids == c).any()))
            rare_share.append(float((ids != c).mean()))
            for k in np.unique(ids).tolist():
                shown_by.setdefault(k, set()).add(int(c))
    return {"sig": np.mean(sig_shown), "rare": np.mean(rare_share), "shown_by": shown_by}


def test_deterministic_per_seed_split_and_index():
    a, b = AttributeShapes(4, 6, 48, seed=1), AttributeShapes(4, 6, 48, seed=1)
    for i in (0, 5):
        for key in ("image", "label", "mask"):
            assert torch.equal(a[i][key], b[i][key])
        np.testing.assert_array_equal(a.parts(i), b.parts(i))
    assert not torch.equal(a[0]["image"], a[1]["image"])
    val = AttributeShapes(4, 6, 48, seed=1, split="val")
    assert not torch.equal(a[0]["image"], val[0]["image"]) and val[0]["id"] == "attributes_val_00000"
    assert not torch.equal(a[0]["image"], AttributeShapes(4, 6, 48, seed=2)[0]["image"])


@pytest.mark.parametrize("num_classes,attributes", [(1, 2), (3, 3), (6, 4)])
def test_masks_are_exact_and_agree_with_labels_and_parts(num_classes, attributes):
    ds = AttributeShapes(num_classes, 16, 64, attributes, seed=0)
    background = set(background_appearances(num_classes, attributes))
    sizes = set()
    for i in range(len(ds)):
        item = ds[i]
        mask = item["mask"].numpy()
        parts = ds.parts(i)
        present = set(np.unique(mask).tolist()) - {0}
        positives = {int(n) + 1 for n in torch.nonzero(item["label"]).flatten()}
        assert present == positives and 1 <= len(positives) <= min(3, num_classes)
        assert 255 not in np.unique(mask) and (mask == 0).any()
        for c in present:
            assert (mask == c).sum() >= 0.03 * 64 * 64
        # every object pixel shows one of its class's appearances; background never does
        assert (parts[mask > 0] >= 0).all()
        assert set(np.unique(parts[mask == 0]).tolist()) <= background | {-1}
        sizes.add(len(positives))
    assert num_classes == 1 or len(sizes) > 1


def test_appearance_table_signature_unique_and_shared_by_partners():
    n, a = 5, 4
    table = [class_attributes(c, n, a) for c in range(n)]
    assert [t[0] for t in table] == list(range(n))  # signatures first: the best-spread hues
    unique = [k for t in table for k in t[:-1]]
    assert len(unique) == len(set(unique)) == n * (a - 1)
    assert table[0][-1] == table[1][-1] and table[2][-1] == table[3][-1] == table[4][-1]  # odd N: a triple
    assert table[0][-1] != table[2][-1] and not set(unique) & {t[-1] for t in table}
    assert partner(0, n) == 1 and partner(3, n) == 2 and partner(4, n) == 3 and partner(0, 1) == 0
    assert set(background_appearances(n, a)).isdisjoint(k for t in table for k in t)


def test_object_slots_signature_first_and_fractions():
    rng = np.random.default_rng(0)
    draws = [object_slots(rng, 4) for _ in range(2000)]
    shown = np.mean([0 in s for s, _ in draws])
    assert abs(shown - SIGNATURE_PROB) < 0.03
    for slots, frac in draws:
        assert 2 <= len(slots) <= 3 and len(set(slots)) == len(slots) and abs(frac.sum() - 1) < 1e-9
        assert 0 not in slots[1:]
        if slots[0] == 0:
            assert 0.2 <= frac[0] <= 0.35


def test_structure_signature_frequent_rare_parts_cover_the_rest_shared_in_two_classes():
    ds = AttributeShapes(6, 96, 64, 4, seed=0)
    s = _stats(ds)
    assert s["sig"] > 0.75                 # the frequent attribute is in most instances
    assert 0.5 < s["rare"] < 0.9           # the others cover most object pixels
    for k in ds.roles()["shared"]:         # each shared appearance shows up in two classes
        assert len(s["shown_by"].get(k, ())) == 2
    for k in ds.roles()["rare"]:           # every rare appearance occurs, in its class only
        assert len(s["shown_by"].get(k, ())) == 1


def test_from_config_names_and_train_crop():
    cfg = DataConfig(dataset="attributes", synthetic_classes=5, synthetic_images=7, synthetic_size=48,
                     attributes_per_class=3, resize_long=(40, 56), crop_size=40)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val", return_rgb=True)
    assert isinstance(train, AttributeShapes) and train.attributes_per_class == 3
    assert len(train) == len(val) == 7 and class_names(cfg) == train.class_names == tuple(f"object{i:02d}" for i in range(5))
    item = train[0]
    assert item["image"].shape == (3, 40, 40) and item["label"].shape == (5,) and item["mask"].shape == (40, 40)
    assert val[0]["image"].shape == (3, 48, 48) and val[0]["rgb"].shape == (48, 48, 3)
    with pytest.raises(ConfigError, match="attributes_per_class"):
        DataConfig(dataset="attributes", attributes_per_class=1)
    with pytest.raises(ValueError, match="attributes_per_class"):
        AttributeShapes(3, 4, 48, 17)


def test_shipped_config_loads():
    cfg = load_config("configs/attributes_tiny.yaml")
    assert cfg.data.dataset == "attributes" and cfg.data.num_classes == cfg.data.synthetic_classes
    assert cfg.model.backbone == "tiny"


def test_fast_enough_for_cpu_training():
    ds = AttributeShapes(6, 40, 96, 4, seed=3)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    per_image = (time.perf_counter() - t0) / len(ds)
    assert per_image < 0.1, f"{per_image * 1000:.0f} ms per 96 px image"
