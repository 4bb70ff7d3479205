"""Tests of cpal_ray.data: readers (VOC, COCO, synthetic), transforms, classes, loaders."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cpal_ray.config import BUNDLED_VOC_MINI, DataConfig
from cpal_ray.data import (COCO_CLASSES, VOC_CLASSES, COCOSegmentation, DataError, SyntheticShapes,
                           VOCSegmentation, build_dataset, build_loader, class_names, collate,
                           colorize, convert_instances, resolve_root, set_epoch, voc_palette)
from cpal_ray.data.assets import VOC12_META_DIR, VOC_MINI_DIR
from cpal_ray.data.coco import COCO_CATEGORY_IDS, annotation_mask, coco_key
from cpal_ray.data.labels import read_label_file
from cpal_ray.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, Normalize, RandomCrop, RandomHFlip,
                                      RandomLongSideResize, TrainTransform, as_rng, resize_nearest)
from cpal_ray.data.voc import find_split_file, normalize_voc_id
from tests.fakes import fake_batch, make_voc_tree, save_labels, write_jpeg, write_mask

pytestmark = pytest.mark.unit

SMALL_TRAIN = dict(resize_long=(24, 40), crop_size=32)


# ------------------------------------------------------------------------------------- classes

def test_class_lists_follow_the_documented_order():
    assert len(VOC_CLASSES) == 20 and len(set(VOC_CLASSES)) == 20
    assert (VOC_CLASSES[0], VOC_CLASSES[14], VOC_CLASSES[19]) == ("aeroplane", "person", "tvmonitor")
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert len(COCO_CATEGORY_IDS) == 80 and list(COCO_CATEGORY_IDS) == sorted(COCO_CATEGORY_IDS)
    assert COCO_CATEGORY_IDS[-1] == 90 and 12 not in COCO_CATEGORY_IDS
    assert COCO_CLASSES[COCO_CATEGORY_IDS.index(18)] == "dog"


def test_voc_palette_matches_the_masks_shipped_with_voc_mini():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[1].tolist() == [128, 0, 0] and pal[15].tolist() == [192, 128, 128]
    assert pal[255].tolist() == [224, 224, 192]
    with Image.open(VOC_MINI_DIR / "SegmentationClass" / "vainf_0.png") as im:
        shipped = np.array(im.getpalette()).reshape(-1, 3)
    np.testing.assert_array_equal(pal[:len(shipped)], shipped)


def test_colorize_keeps_values_and_uses_palette():
    m = np.array([[0, 1, 15], [255, 20, 3]], dtype=np.int64)
    img = colorize(m)
    assert img.mode == "P"
    np.testing.assert_array_equal(np.array(img), m)
    np.testing.assert_array_equal(np.array(img.convert("RGB"))[0, 2], voc_palette()[15])


# ----------------------------------------------------------------------------------- transforms

def _ramp(h=20, w=30):
    """rgb whose red = column, green = row; mask = column % 7 (values move with the pixels)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 8, yy * 12, np.full_like(xx, 50)], axis=-1).astype(np.uint8)
    return rgb, (xx % 7).astype(np.uint8)


def test_as_rng_accepts_seeds_and_generators():
    assert as_rng(3).integers(0, 10**9) == as_rng(3).integers(0, 10**9)
    g = np.random.default_rng(0)
    assert as_rng(g) is g
    a = as_rng(torch.Generator().manual_seed(5)).integers(0, 10**9)
    assert a == as_rng(torch.Generator().manual_seed(5)).integers(0, 10**9)
    with pytest.raises(TypeError):
        as_rng("seed")


def test_resize_nearest_copies_blocks():
    m = np.array([[1, 2], [3, 255]], dtype=np.uint8)
    out = resize_nearest(m, (4, 6))
    np.testing.assert_array_equal(out, np.kron(m, np.ones((2, 3), dtype=np.uint8)))


@pytest.mark.parametrize("seed", range(6))
def test_long_side_resize_stays_in_range_and_keeps_aspect(seed):
    rgb, mask = _ramp(20, 30)
    mask[0, 0] = 255
    out_rgb, out_mask = RandomLongSideResize(35, 50)(rgb, mask, seed)
    h, w = out_mask.shape
    assert 35 <= max(h, w) <= 50 and out_rgb.shape == (h, w, 3) and out_rgb.dtype == np.uint8
    assert abs(h / w - 20 / 30) < 0.05
    assert set(np.unique(out_mask)) <= set(np.unique(mask))  # nearest: no blended labels


def test_long_side_resize_draws_both_ends():
    sides = {max(RandomLongSideResize(10, 12)(*_ramp(), s)[1].shape) for s in range(40)}
    assert sides == {10, 11, 12}


def test_hflip_mirrors_image_and_mask_together():
    rgb, mask = _ramp()
    f_rgb, f_mask = RandomHFlip(1.0)(rgb, mask, 0)
    np.testing.assert_array_equal(f_rgb, rgb[:, ::-1])
    np.testing.assert_array_equal(f_mask, mask[:, ::-1])
    np.testing.assert_array_equal(f_rgb[..., 0] // 8 % 7, f_mask)  # still aligned
    same = RandomHFlip(0.0)(rgb, mask, 0)
    np.testing.assert_array_equal(same[0], rgb)
    flips = [RandomHFlip(0.5)(rgb, mask, s)[1][0, 0] != mask[0, 0] for s in range(40)]
    assert 5 < sum(flips) < 35


def test_normalize_uses_imagenet_statistics():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = 255
    image, mask = Normalize()(rgb, np.ones((2, 3), dtype=np.uint8))
    assert image.shape == (3, 2, 3) and image.dtype == torch.float32 and mask.dtype == torch.int64
    expect_white = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    expect_black = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(image[:, 0, 0].numpy(), expect_white, rtol=1e-5)
    np.testing.assert_allclose(image[:, 1, 2].numpy(), expect_black, rtol=1e-5)


def test_random_crop_pads_small_inputs_with_0_and_255():
    image = torch.arange(3 * 10 * 14, dtype=torch.float32).view(3, 10, 14) + 1
    mask = torch.ones(10, 14, dtype=torch.int64)
    out, out_mask = RandomCrop(16)(image, mask, 0)
    assert out.shape == (3, 16, 16) and out_mask.shape == (16, 16)
    assert (out_mask == 255).sum() == 16 * 16 - 10 * 14 and (out_mask == 1).sum() == 10 * 14
    assert (out[:, out_mask == 255] == 0).all()
    ys, xs = torch.nonzero(out_mask == 1, as_tuple=True)
    np.testing.assert_array_equal(out[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1], image)


def test_random_crop_cuts_large_inputs():
    image = torch.arange(3 * 40 * 50, dtype=torch.float32).view(3, 40, 50)
    mask = torch.arange(40 * 50).view(40, 50)
    out, out_mask = RandomCrop(16)(image, mask, 1)
    y, x = divmod(int(out_mask[0, 0]), 50)
    np.testing.assert_array_equal(out_mask, mask[y:y + 16, x:x + 16])
    np.testing.assert_array_equal(out, image[:, y:y + 16, x:x + 16])


def test_train_transform_is_deterministic_and_rgb_stays_aligned():
    rgb, mask = _ramp(40, 60)
    t = TrainTransform((30, 50), 32)
    a, b = t(rgb, mask, 7), t(rgb, mask, 7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a[0].shape == (3, 32, 32) and a[1].shape == (32, 32) and a[2].shape == (32, 32, 3)
    outs = {t(rgb, mask, s)[1].numpy().tobytes() for s in range(8)}
    assert len(outs) > 4
    image, m, crop_rgb = t(rgb, mask, 3)
    inside = (m != 255).numpy()
    renorm = Normalize()(crop_rgb, m.numpy())[0]
    np.testing.assert_allclose(renorm[:, inside], image[:, inside], atol=1e-5)
    assert (image[:, ~inside] == 0).all()


# ---------------------------------------------------------------------------------- VOC reader

def test_normalize_voc_id_both_ways():
    assert normalize_voc_id(2007000032) == "2007_000032"
    assert normalize_voc_id(np.int32(2011000003)) == "2011_000003"
    assert normalize_voc_id("2007000032") == normalize_voc_id("2007_000032") == "2007_000032"
    assert normalize_voc_id("c128_000000000030") == "c128_000000000030"


@pytest.mark.parametrize("key_style", ["str", "int"])
def test_voc_reader_reads_both_label_key_styles(tmp_path, key_style):
    fake = make_voc_tree(tmp_path, key_style=key_style)
    ds = VOCSegmentation(tmp_path, "train")
    assert ds.ids == fake.ids and len(ds) == 3 and ds.skipped == []
    for i, sid in enumerate(fake.ids):
        item = ds[i]
        assert item["id"] == sid and "rgb" not in item
        assert item["image"].shape == (3, 24, 32) and item["image"].dtype == torch.float32
        np.testing.assert_array_equal(item["label"].numpy(), fake.labels[sid])
        assert item["mask"].dtype == torch.int64
        np.testing.assert_array_equal(item["mask"].numpy(), fake.masks[sid])


def test_voc_reader_returns_rgb_and_missing_masks_are_ignore(tmp_path):
    fake = make_voc_tree(tmp_path, with_masks=False, list_in="root")
    ds = VOCSegmentation(tmp_path, "train", return_rgb=True)
    item = ds[1]
    assert item["rgb"].dtype == np.uint8 and item["rgb"].shape == (24, 32, 3)
    assert np.abs(item["rgb"].astype(int) - fake.rgbs[fake.ids[1]]).mean() < 3  # JPEG, lossy
    assert (item["mask"] == 255).all()


def test_voc_split_can_be_a_path_and_labels_a_config_path(tmp_path):
    fake = make_voc_tree(tmp_path / "voc")
    (tmp_path / "mine.txt").write_text(f"{fake.ids[2]}\n\n# comment\n")
    other = {sid: np.eye(20, dtype=np.float32)[7] for sid in fake.ids}
    save_labels(tmp_path / "other.npy", other, "int")
    ds = VOCSegmentation(tmp_path / "voc", str(tmp_path / "mine.txt"), cls_labels=str(tmp_path / "other.npy"))
    assert ds.ids == [fake.ids[2]]
    assert ds.labels_file == tmp_path / "other.npy" and ds[0]["label"].argmax() == 7


def test_voc_falls_back_to_packaged_voc12_labels_and_lists(tmp_path):
    make_voc_tree(tmp_path, ids=("2007_000032",))
    (tmp_path / "cls_labels.npy").unlink()
    ds = VOCSegmentation(tmp_path, "train")
    assert ds.labels_file == VOC12_META_DIR / "cls_labels.npy"
    positives = [VOC_CLASSES[n] for n in np.flatnonzero(ds.label_of(0))]
    assert positives == ["aeroplane", "person"]  # the real VOC 2012 label of 2007_000032
    assert find_split_file(tmp_path, "train_aug") == VOC12_META_DIR / "train_aug.txt"


def test_packaged_voc12_meta_is_complete():
    raw = np.load(VOC12_META_DIR / "cls_labels.npy", allow_pickle=True).item()
    assert len(raw) == 12031 and all(isinstance(k, (int, np.integer)) for k in list(raw)[:50])
    counts = {s: len((VOC12_META_DIR / f"{s}.txt").read_text().split()) for s in ("train_aug", "train", "val")}
    assert counts == {"train_aug": 10582, "train": 1464, "val": 1449}


# ---------------------------------------------------------------------------- bundled voc-mini

def test_bundled_voc_mini_resolves_from_the_package_not_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig()
    assert cfg.root == BUNDLED_VOC_MINI and resolve_root(cfg) == VOC_MINI_DIR
    assert (VOC_MINI_DIR / "PROVENANCE.md").is_file()
    train, val = build_dataset(cfg, "train", train=False), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (97, 17)
    assert train.ids[0] == "c128_000000000030" and set(train.ids).isdisjoint(val.ids)


@pytest.mark.parametrize("sid", ["voc_2011_000006", "c128_000000000030", "vainf_0"])
def test_bundled_labels_match_mask_classes(sid):
    ds = VOCSegmentation(BUNDLED_VOC_MINI, "val" if not sid.startswith("c128") else "train")
    item = ds[ds.ids.index(sid)]
    in_mask = set(item["mask"].unique().tolist()) - {0, 255}
    assert in_mask == {int(n) + 1 for n in torch.nonzero(item["label"]).flatten()} and in_mask
    if sid == "voc_2011_000006":
        assert {VOC_CLASSES[n - 1] for n in in_mask} == {"chair", "person", "sofa"}


# --------------------------------------------------------------------------------- bad inputs

def _assert_names(err: pytest.ExceptionInfo, path, sid):
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and str(path) in msg and sid in msg, msg


def test_missing_jpeg_is_reported_at_construction(tmp_path):
    fake = make_voc_tree(tmp_path)
    fake.image(fake.ids[1]).unlink()
    with pytest.raises(DataError) as err:
        VOCSegmentation(tmp_path, "train")
    _assert_names(err, fake.image(fake.ids[1]), fake.ids[1])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg_is_reported_when_loaded(tmp_path, damage):
    fake = make_voc_tree(tmp_path, size=(64, 80))
    path = fake.image(fake.ids[0])
    data = path.read_bytes()
    path.write_bytes(b"this is not a jpeg" if damage == "garbage" else data[: len(data) // 2])
    ds = VOCSegmentation(tmp_path, "train")
    with pytest.raises(DataError) as err:
        ds[0]
    _assert_names(err, path, fake.ids[0])
    assert ds[1]["id"] == fake.ids[1]


def test_id_missing_from_labels(tmp_path):
    fake = make_voc_tree(tmp_path, key_style="int")
    del fake.labels[fake.ids[2]]
    save_labels(tmp_path / "cls_labels.npy", fake.labels, "int")
    with pytest.raises(DataError) as err:
        VOCSegmentation(tmp_path, "train")
    _assert_names(err, tmp_path / "cls_labels.npy", fake.ids[2])


@pytest.mark.parametrize("bad", ["zeros", "wrong_length", "not_binary"])
def test_unusable_label_vectors(tmp_path, bad):
    fake = make_voc_tree(tmp_path)
    fake.labels[fake.ids[0]] = {"zeros": np.zeros(20), "wrong_length": np.ones(21),
                                "not_binary": np.full(20, 0.5)}[bad].astype(np.float32)
    save_labels(tmp_path / "cls_labels.npy", fake.labels)
    with pytest.raises(DataError) as err:
        VOCSegmentation(tmp_path, "train")
    _assert_names(err, tmp_path / "cls_labels.npy", fake.ids[0])


def test_mask_values_outside_classes(tmp_path):
    fake = make_voc_tree(tmp_path)
    mask = fake.masks[fake.ids[1]].copy()
    mask[0, 0] = 21
    write_mask(fake.mask(fake.ids[1]), mask)
    ds = VOCSegmentation(tmp_path, "train")
    with pytest.raises(DataError, match="21") as err:
        ds[1]
    _assert_names(err, fake.mask(fake.ids[1]), fake.ids[1])


def test_mask_image_size_mismatch(tmp_path):
    fake = make_voc_tree(tmp_path)
    write_mask(fake.mask(fake.ids[0]), np.zeros((24, 31), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        VOCSegmentation(tmp_path, "train")[0]
    _assert_names(err, fake.mask(fake.ids[0]), fake.ids[0])
    assert str(fake.image(fake.ids[0])) in str(err.value)


def test_skip_mode_drops_and_records_bad_ids(tmp_path, caplog):
    ids = ("2007_000001", "2007_000002", "2007_000003", "2007_000004", "2007_000005")
    fake = make_voc_tree(tmp_path, ids=ids)
    fake.image(ids[0]).unlink()
    del fake.labels[ids[2]]
    fake.labels[ids[3]] = np.zeros(20, dtype=np.float32)
    save_labels(tmp_path / "cls_labels.npy", fake.labels)
    with caplog.at_level(logging.WARNING, logger="cpal_ray.data"):
        ds = VOCSegmentation(tmp_path, "train", on_bad_sample="skip")
    assert ds.ids == [ids[1], ids[4]]
    assert [sid for sid, _ in ds.skipped] == [ids[0], ids[2], ids[3]]
    assert "missing" in ds.skipped[0][1] and "no positive" in ds.skipped[2][1]
    assert ids[0] in caplog.text and "skipped 3 of 5" in caplog.text
    np.testing.assert_array_equal(ds[1]["label"].numpy(), fake.labels[ids[4]])


def test_validate_finds_load_time_problems(tmp_path):
    fake = make_voc_tree(tmp_path)
    fake.image(fake.ids[1]).write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataError, match="1 bad samples") as err:
        VOCSegmentation(tmp_path, "train").validate()
    _assert_names(err, fake.image(fake.ids[1]), fake.ids[1])
    ds = VOCSegmentation(tmp_path, "train", on_bad_sample="skip")
    problems = ds.validate()
    assert [p[0] for p in problems] == [fake.ids[1]] and ds.ids == [fake.ids[0], fake.ids[2]]
    assert ds.skipped[-1][0] == fake.ids[1]


def test_all_bad_is_an_error_even_when_skipping(tmp_path):
    fake = make_voc_tree(tmp_path, ids=("2007_000001",))
    fake.image("2007_000001").unlink()
    with pytest.raises(DataError, match="no usable samples"):
        VOCSegmentation(tmp_path, "train", on_bad_sample="skip")


# ----------------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_per_seed_split_and_index():
    a, b = SyntheticShapes(5, 6, 48, seed=1), SyntheticShapes(5, 6, 48, seed=1)
    for i in (0, 5):
        for key in ("image", "label", "mask"):
            assert torch.equal(a[i][key], b[i][key])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    val = SyntheticShapes(5, 6, 48, seed=1, split="val")
    assert not torch.equal(a[0]["image"], val[0]["image"]) and val[0]["id"] == "synthetic_val_00000"
    assert not torch.equal(a[0]["image"], SyntheticShapes(5, 6, 48, seed=2)[0]["image"])


@pytest.mark.parametrize("num_classes", [1, 3, 7])
def test_synthetic_masks_agree_with_labels(num_classes):
    ds = SyntheticShapes(num_classes, 12, 48, seed=0)
    sizes = set()
    for i in range(len(ds)):
        item = ds[i]
        present = set(item["mask"].unique().tolist()) - {0}
        positives = {int(n) + 1 for n in torch.nonzero(item["label"]).flatten()}
        assert present == positives and 1 <= len(positives) <= min(3, num_classes)
        assert 255 not in present and (item["mask"] == 0).any()
        for c in present:  # every labelled class is clearly visible
            assert (item["mask"] == c).sum() >= 0.03 * 48 * 48
        sizes.add(len(positives))
    assert num_classes == 1 or len(sizes) > 1


def test_synthetic_classes_are_separable_by_colour():
    ds = SyntheticShapes(4, 16, 64, seed=0, return_rgb=True)
    sat = {c: [] for c in range(5)}
    for i in range(len(ds)):
        item = ds[i]
        rgb = item["rgb"].astype(np.float32)
        s = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1)
        for c in range(5):
            sat[c].append(s[item["mask"].numpy() == c])
    bg = np.concatenate(sat[0])
    assert np.quantile(bg, 0.95) < 0.25
    for c in range(1, 5):
        fg = np.concatenate(sat[c])
        assert fg.size > 0 and np.quantile(fg, 0.1) > 0.4


def test_synthetic_from_config_and_train_crop():
    cfg = DataConfig(dataset="synthetic", synthetic_classes=5, synthetic_images=7, synthetic_size=48,
                     resize_long=(40, 56), crop_size=40)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val", return_rgb=True)
    assert len(train) == len(val) == 7 and class_names(cfg) == train.class_names and len(class_names(cfg)) == 5
    item = train[0]
    assert item["image"].shape == (3, 40, 40) and item["label"].shape == (5,) and item["mask"].shape == (40, 40)
    assert val[0]["image"].shape == (3, 48, 48) and val[0]["rgb"].shape == (48, 48, 3)


# ----------------------------------------------------------------------------------------- COCO

def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a bool mask (column-major runs, zeros first)."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def _compressed(mask: np.ndarray) -> str:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


def _small_mask():
    m = np.zeros((6, 9), dtype=bool)
    m[1:5, 2:7] = m[3, 8] = m[0, 1] = True
    return m


def test_annotation_mask_decodes_every_coco_form():
    m = _small_mask()
    for seg in ({"size": [6, 9], "counts": _rle_counts(m)}, {"size": [6, 9], "counts": _compressed(m)},
                {"size": [6, 9], "counts": _compressed(m).encode()}):
        np.testing.assert_array_equal(annotation_mask(seg, 6, 9), m)
    square = annotation_mask([[2, 1, 6, 1, 6, 4, 2, 4]], 6, 9)  # polygon x, y pairs
    assert square[2, 3] and square[3, 5] and not square[5, 8] and not square[0, 0]
    with pytest.raises(DataError, match="annotation 7: RLE counts"):
        annotation_mask({"size": [3, 4], "counts": [5, 2]}, 3, 4, ann_id=7)
    with pytest.raises(DataError, match="RLE size"):
        annotation_mask({"size": [6, 9], "counts": _rle_counts(m)}, 9, 6)


def _instances(tmp_path):
    crowd = np.zeros((20, 30), dtype=bool)
    crowd[16:19, 0:6] = True
    data = {
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}],
        "images": [{"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "height": 6, "width": 9},
                   {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 20, "width": 30},
                   {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "height": 8, "width": 8}],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": 120.0,
             "segmentation": [[2, 2, 17, 2, 17, 10, 2, 10]]},
            {"id": 2, "image_id": 9, "category_id": 18, "iscrowd": 0, "area": 200.0,
             "segmentation": [[15, 5, 29, 5, 29, 15, 15, 15]]},
            {"id": 3, "image_id": 9, "category_id": 1, "iscrowd": 1, "area": 18.0,
             "segmentation": {"size": [20, 30], "counts": _rle_counts(crowd)}},
            {"id": 4, "image_id": 42, "category_id": 90, "iscrowd": 0, "area": 14.0,
             "segmentation": {"size": [6, 9], "counts": _compressed(_small_mask())}},
        ]}
    path = tmp_path / "instances_train2014.json"
    path.write_text(json.dumps(data))
    return path


def test_convert_instances_writes_masks_labels_and_list(tmp_path):
    out = tmp_path / "coco"
    out.mkdir()
    np.save(out / "cls_labels.npy", {"COCO_val2014_000000000001": np.eye(80, dtype=np.float32)[3]})
    stats = convert_instances(_instances(tmp_path), out, "train")
    assert stats == {"images": 3, "written": 2, "no_annotations": 1, "crowd": 1}
    assert (out / "train.txt").read_text().split() == ["COCO_train2014_000000000009", "COCO_train2014_000000000042"]
    labels = read_label_file(out / "cls_labels.json")  # the .npy entries merged into the plain format
    assert set(labels) == {"COCO_val2014_000000000001", "COCO_train2014_000000000009", "COCO_train2014_000000000042"}
    assert np.flatnonzero(labels["COCO_train2014_000000000009"]).tolist() == [0, 16]  # person, dog
    assert np.flatnonzero(labels["COCO_train2014_000000000042"]).tolist() == [79]     # toothbrush
    m9 = np.array(Image.open(out / "mask" / "train2014" / "COCO_train2014_000000000009.png"))
    assert m9.shape == (20, 30)
    assert m9[4, 4] == 1 and m9[12, 25] == 17 and m9[7, 16] == 1  # small person painted over dog
    assert m9[17, 3] == 255 and m9[0, 0] == 0 and m9[18, 6] == 0
    assert set(np.unique(m9)) == {0, 1, 17, 255}
    m42 = np.array(Image.open(out / "mask" / "train2014" / "COCO_train2014_000000000042.png"))
    np.testing.assert_array_equal(m42, np.where(_small_mask(), 80, 0))
    bad = json.loads(_instances(tmp_path).read_text())
    bad["categories"].append({"id": 12, "name": "street sign"})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="12"):
        convert_instances(tmp_path / "bad.json", out, "train")


@pytest.mark.parametrize("key_style", ["stem", "int"])
def test_coco_reader_reads_converted_tree(tmp_path, key_style):
    out = tmp_path / "coco"
    convert_instances(_instances(tmp_path), out, "train")
    write_jpeg(out / "train2014" / "COCO_train2014_000000000009.jpg", np.full((20, 30, 3), 90, np.uint8))
    write_jpeg(out / "train2014" / "COCO_train2014_000000000042.jpg", np.full((6, 9, 3), 90, np.uint8))
    if key_style == "int":  # the int-keyed npy dict of the public WSSS code, read without pickle's globals
        raw = read_label_file(out / "cls_labels.json")
        (out / "cls_labels.json").unlink()
        np.save(out / "cls_labels.npy", {coco_key(k): v for k, v in raw.items()})
    cfg = DataConfig(dataset="coco", root=str(out), **SMALL_TRAIN)
    ds = build_dataset(cfg, "train", train=False)
    assert isinstance(ds, COCOSegmentation) and len(ds) == 2 and ds.class_names == COCO_CLASSES
    item = ds[1]
    assert item["id"] == "COCO_train2014_000000000042" and item["label"].shape == (80,)
    assert item["label"][79] == 1 and item["label"].sum() == 1
    np.testing.assert_array_equal(item["mask"].numpy(), np.where(_small_mask(), 80, 0))
    assert build_dataset(cfg, "train")[0]["image"].shape == (3, 32, 32)


# --------------------------------------------------------------------------- build / collate / loader

def test_build_dataset_dispatch_and_errors(tmp_path):
    fake = make_voc_tree(tmp_path, split="train_aug")
    cfg = DataConfig(root=str(tmp_path), train_split="train_aug", **SMALL_TRAIN)
    ds = build_dataset(cfg, "train")
    assert isinstance(ds, VOCSegmentation) and ds.ids == fake.ids
    assert ds[0]["image"].shape == (3, 32, 32)            # train transform by default
    assert build_dataset(cfg, "train_aug")[0]["image"].shape == (3, 24, 32)  # other names: eval
    with pytest.raises(DataError, match="image file missing"):
        build_dataset(cfg, "val")  # no val list in the tree: the packaged VOC list's ids have no images
    with pytest.raises(DataError, match="dataset=voc"):
        build_dataset(DataConfig(dataset="coco"), "train")
    assert class_names(DataConfig()) == VOC_CLASSES and class_names(DataConfig(dataset="coco")) == COCO_CLASSES


def test_loader_batches_shuffles_by_seed_and_reaugments_per_epoch():
    ds = SyntheticShapes(3, 8, 48, transform=TrainTransform((32, 64), 32), return_rgb=True)
    order = lambda seed: [i for b in build_loader(ds, 4, shuffle=True, seed=seed) for i in b["id"]]
    assert order(0) == order(0) and sorted(order(0)) == ds.ids and order(0) != order(1)
    loader = build_loader(ds, 4, shuffle=False, seed=0, drop_last=True)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4, 3)
    assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == torch.int64
    assert len(batch["rgb"]) == 4 and batch["rgb"][0].shape == (32, 32, 3)
    again = next(iter(loader))
    assert torch.equal(batch["image"], again["image"])
    set_epoch(loader, 1)
    assert ds.epoch == 1 and not torch.equal(batch["image"], next(iter(loader))["image"])


def test_collate_refuses_mixed_sizes_and_fake_batch_is_consistent():
    items = [{"id": "a", "image": torch.zeros(3, 4, 5), "label": torch.ones(2), "mask": torch.zeros(4, 5)},
             {"id": "b", "image": torch.zeros(3, 4, 6), "label": torch.ones(2), "mask": torch.zeros(4, 6)}]
    with pytest.raises(ValueError, match="batch_size=1"):
        collate(items)
    assert collate(items[:1])["image"].shape == (1, 3, 4, 5)
    fb = fake_batch(3, 4, 16)
    for b in range(3):
        present = set(fb["mask"][b].unique().tolist()) - {0, 255}
        assert present == {int(n) + 1 for n in torch.nonzero(fb["label"][b]).flatten()}


def test_max_side_downscales_every_view_of_an_image_alike():
    """data.max_side: read, read_image, image_size (the pipelines' view) and the mask agree."""
    from cpal_ray.config import load_config
    from cpal_ray.data import build_dataset

    full = build_dataset(load_config("configs/voc_mini_cpu.yaml", ["data.max_side=0"]).data, "val", train=False)
    small = build_dataset(load_config("configs/voc_mini_cpu.yaml", ["data.max_side=200"]).data, "val", train=False)
    rgb0, mask0, _ = full.read(0)
    rgb, mask, _ = small.read(0)
    assert max(rgb0.shape[:2]) > 200 and max(rgb.shape[:2]) == 200 and mask.shape == rgb.shape[:2]
    assert abs(rgb.shape[0] / rgb.shape[1] - rgb0.shape[0] / rgb0.shape[1]) < 0.02
    assert small.image_size(0) == rgb.shape[:2] and small.read_image(0).shape == rgb.shape
    assert set(np.unique(mask)) <= set(np.unique(mask0))  # nearest: no new label values
    assert small[0]["image"].shape[1:] == rgb.shape[:2]


def test_every_dataset_answers_read_image_and_image_size_as_read_does(tmp_path):
    """read_image and image_size (what CRF, figures and the pipelines use) agree with read, for
    procedural sets, a folder of photos and a file reader alike."""
    from cpal_ray.data import ImageFolderDataset

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((30, 44, 3), 90, np.uint8)).save(photos / "a.png")
    make_voc_tree(tmp_path / "voc")
    for ds in (SyntheticShapes(num_classes=3, num_images=2, size=32), ImageFolderDataset(photos, 3, "xyz"),
               VOCSegmentation(tmp_path / "voc", "train")):
        rgb = ds.read(0)[0]
        assert np.array_equal(ds.read_image(0), rgb) and tuple(ds.image_size(0)) == rgb.shape[:2]
