"""ConfusionMatrix, cams_to_label, ThresholdSweep and the seed report (cpal_ray.inference.metrics)."""
import json
import math

import numpy as np
import pytest
import torch

from cpal_ray.config import InferenceConfig
from cpal_ray.inference.metrics import (ConfusionMatrix, ThresholdSweep, cams_to_label, sweep_thresholds,
                                        thresholds_from_config, write_report)

pytestmark = pytest.mark.unit


def plain_miou(preds, gts, n, ignore=255):
    """Independent reference: loops over classes, boolean masks, no bincount."""
    tp = np.zeros(n)
    fp = np.zeros(n)
    fn = np.zeros(n)
    for p, g in zip(preds, gts):
        valid = g != ignore
        for c in range(n):
            pc, gc = (p == c) & valid, (g == c) & valid
            tp[c] += np.sum(pc & gc)
            fp[c] += np.sum(pc & ~gc)
            fn[c] += np.sum(~pc & gc)
    ious = [tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(n) if tp[c] + fp[c] + fn[c] > 0]
    return sum(ious) / len(ious)


def test_hand_worked_3x3():
    gt = np.array([[0, 0, 1], [1, 1, 2], [2, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2], [2, 1, 0]])
    cm = ConfusionMatrix(4).update(pred, gt)
    assert cm.mat.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    r = cm.compute()
    np.testing.assert_allclose(r["iou"][:3], [1 / 3, 2 / 5, 2 / 3])
    assert math.isnan(r["iou"][3])
    assert r["present"].tolist() == [True, True, True, False]
    assert r["miou"] == pytest.approx(7 / 15, abs=1e-12)
    assert r["pixel_acc"] == pytest.approx(5 / 8)
    assert r["pixels"] == 8


def test_class_only_in_prediction_counts_with_iou_zero():
    gt = np.zeros((3, 3), dtype=np.int64)
    pred = gt.copy()
    pred[1, 1] = 2
    r = ConfusionMatrix(3).update(pred, gt).compute()
    assert r["present"].tolist() == [True, False, True]
    assert r["iou"][0] == pytest.approx(8 / 9) and r["iou"][2] == 0.0 and math.isnan(r["iou"][1])
    assert r["miou"] == pytest.approx(4 / 9)


def test_empty_matrix_is_nan():
    r = ConfusionMatrix(21).compute()
    assert math.isnan(r["miou"]) and math.isnan(r["pixel_acc"]) and not r["present"].any()


@pytest.mark.parametrize("n", [3, 21, 81])
def test_random_maps_match_plain_numpy(n):
    rng = np.random.default_rng(n)
    preds, gts = [], []
    cm = ConfusionMatrix(n)
    for _ in range(4):
        shape = tuple(rng.integers(5, 40, size=2))
        gt = rng.integers(0, n, size=shape)
        gt[rng.random(shape) < 0.1] = 255
        pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, n, size=shape))
        pred[pred == 255] = 0
        cm.update(pred, gt)
        preds.append(pred)
        gts.append(gt)
    assert abs(cm.compute()["miou"] - plain_miou(preds, gts, n)) < 1e-9


def test_merge_equals_one_big_update_and_iadd():
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 5, (6, 7)), rng.integers(0, 5, (6, 7))) for _ in range(6)]
    whole = ConfusionMatrix(5)
    for p, g in pairs:
        whole.update(p, g)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    for p, g in pairs[:2]:
        a.update(p, g)
    for p, g in pairs[2:]:
        b.update(p, g)
    merged = ConfusionMatrix(5).merge(a)
    merged += b
    np.testing.assert_array_equal(merged.mat, whole.mat)
    assert merged.compute()["miou"] == whole.compute()["miou"]
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(6))


def test_update_accepts_torch_and_validates():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [255, 2]]))
    assert cm.mat.sum() == 3
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="gt values"):
        cm.update(np.zeros((1, 1), int), np.full((1, 1), 3))
    with pytest.raises(ValueError, match="pred values"):
        cm.update(np.full((1, 1), 255), np.zeros((1, 1), int))
    # A pseudo-label's 255 can be skipped instead (accuracy on the confident region).
    before = cm.mat.copy()
    cm.update(np.array([255, 1]), np.array([0, 1]), ignore_pred=True)
    assert cm.mat.sum() == before.sum() + 1 and cm.mat[1, 1] == before[1, 1] + 1


def test_cams_to_label_background_wins_ties():
    cams = np.array([[[0.9, 0.2, 0.15]], [[0.5, 0.6, 0.1]]], dtype=np.float32)  # (K=2, 1, 3)
    lab = cams_to_label(cams, np.array([4, 11]), 0.15)  # pixel 2: 0.15 == threshold -> background
    assert lab.dtype == np.int64 and lab.tolist() == [[5, 12, 0]]
    assert cams_to_label(np.zeros((0, 2, 2)), np.zeros(0, int), 0.3).tolist() == [[0, 0], [0, 0]]


def test_sweep_thresholds_inclusive_and_rounded():
    thr = sweep_thresholds(0.0, 0.6, 0.01)
    assert len(thr) == 61 and thr[0] == 0.0 and thr[-1] == 0.6 and thr[7] == 0.07
    assert sweep_thresholds(0.1, 0.3, 0.1) == (0.1, 0.2, 0.3)
    assert sweep_thresholds(0.2, 0.2, 0.05) == (0.2,)
    assert thresholds_from_config(InferenceConfig(threshold_stop=0.6)) == thr
    assert thresholds_from_config(InferenceConfig()) == sweep_thresholds(0.0, 0.95, 0.01)  # the default range
    assert thresholds_from_config(InferenceConfig(fixed_threshold=0.15)) == (0.15,)


def test_a_best_threshold_at_the_end_of_the_range_is_flagged():
    cams = np.array([[[0.9, 0.8, 0.2, 0.12]]], dtype=np.float32)  # (K=1, 1, 4): class 1 on the first two pixels
    gt = np.array([[1, 1, 0, 0]])
    inside = ThresholdSweep(2, (0.1, 0.5, 0.85))
    inside.update(cams, np.array([0]), gt)
    assert inside.results()["best_threshold"] == 0.5 and not inside.results()["threshold_at_edge"]
    cut = ThresholdSweep(2, (0.05, 0.1, 0.15))  # every threshold below the gap: the optimum lies above
    cut.update(cams, np.array([0]), gt)
    assert cut.results()["best_threshold"] == 0.15 and cut.results()["threshold_at_edge"]


def _random_image(rng, n_fg, shape):
    k = int(rng.integers(0, 4))
    classes = np.sort(rng.choice(n_fg, size=k, replace=False))
    # Multiples of 0.05 so that some CAM values equal a threshold exactly (tie -> background).
    cams = (rng.integers(0, 21, size=(k, *shape)) * 0.05).astype(np.float32)
    gt = rng.integers(0, n_fg + 1, size=shape)
    gt[rng.random(shape) < 0.1] = 255
    return cams, classes, gt


def test_sweep_equals_one_matrix_per_threshold():
    rng = np.random.default_rng(3)
    thr = sweep_thresholds(0.0, 0.6, 0.05)
    sweep = ThresholdSweep(6, thr)
    ref = [ConfusionMatrix(6) for _ in thr]
    for _ in range(8):
        cams, classes, gt = _random_image(rng, 5, (9, 11))
        sweep.update(cams, classes, gt)
        for m, t in zip(ref, thr):
            m.update(cams_to_label(cams, classes, t), gt)
    for m, r in zip(sweep.matrices, ref):
        np.testing.assert_array_equal(m.mat, r.mat)


def test_sweep_picks_the_right_threshold():
    # Background pixels score 0.10 or 0.20, object pixels 0.25 or 0.50: only thresholds in
    # [0.20, 0.25) separate them perfectly; the first of those is 0.20.
    gt = np.zeros((4, 8), dtype=np.int64)
    gt[:, 4:] = 3
    cam = np.zeros((1, 4, 8), dtype=np.float32)
    cam[0, :2, :4], cam[0, 2:, :4] = 0.10, 0.20
    cam[0, :2, 4:], cam[0, 2:, 4:] = 0.25, 0.50
    sweep = ThresholdSweep.from_config(21, InferenceConfig())
    sweep.update(cam, np.array([2]), gt)
    res = sweep.results()
    assert res["best_threshold"] == pytest.approx(0.20)
    assert res["best_miou"] == pytest.approx(1.0)
    curve = dict(zip(np.round(res["thresholds"], 2), res["miou"]))
    assert curve[0.19] < 1 and curve[0.24] == pytest.approx(1.0) and curve[0.25] < 1
    assert res["present"][0] and res["present"][3] and not res["present"][1]
    assert math.isnan(res["iou"][1]) and res["iou"][3] == pytest.approx(1.0)


def test_sweep_merge_and_validation():
    rng = np.random.default_rng(5)
    thr = (0.1, 0.3, 0.5)
    whole, a, b = ThresholdSweep(4, thr), ThresholdSweep(4, thr), ThresholdSweep(4, thr)
    for i in range(6):
        cams, classes, gt = _random_image(rng, 3, (5, 6))
        whole.update(cams, classes, gt)
        (a if i % 2 else b).update(cams, classes, gt)
    a += b
    for m, w in zip(a.matrices, whole.matrices):
        np.testing.assert_array_equal(m.mat, w.mat)
    with pytest.raises(ValueError):
        a.merge(ThresholdSweep(4, (0.1, 0.3)))
    with pytest.raises(ValueError):
        a.update(np.zeros((1, 5, 6), np.float32), np.array([3]), np.zeros((5, 6), int))  # label 4 >= 4
    with pytest.raises(ValueError):
        a.update(np.zeros((1, 5, 6), np.float32), np.array([0]), np.zeros((5, 7), int))


def test_write_report(tmp_path):
    sweep = ThresholdSweep(3, (0.1, 0.2, 0.3))
    gt = np.array([[0, 0, 1, 1]])
    sweep.update(np.array([[[0.0, 0.15, 0.25, 0.9]]], np.float32), np.array([0]), gt)
    res = sweep.results()
    paths = write_report(res, tmp_path / "report", ["background", "cat", "dog"])
    data = json.loads(paths["json"].read_text())
    assert data["best_threshold"] == pytest.approx(0.2) and data["best_miou"] == pytest.approx(1.0)
    assert data["iou"][2] is None and data["class_names"][1] == "cat"
    md = paths["md"].read_text()
    assert "100.00" in md and "0.20" in md and "| dog | — |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "miou_vs_threshold.png", "seeds.json", "seeds.md"]
    with pytest.raises(ValueError):
        write_report(res, tmp_path, ["background"])
