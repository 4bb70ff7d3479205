"""The report figures are written as real, non-blank PNGs."""
import numpy as np
import pytest
from PIL import Image

from cpal_ray.cpal import PrototypeBank
from cpal_ray.inference.visuals import (_series, bank_plot, colour_labels, diagnostic_curves, image_grid, iou_bars,
                                       miou_curves, pca_2d)

pytestmark = pytest.mark.unit


def assert_png(path, min_side=100):
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert min(arr.shape[:2]) >= min_side and arr.std() > 5  # not a blank canvas


def test_image_grid_and_label_colours(tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((40, 50), dtype=np.uint8)
    label[10:20, 10:30] = 15
    label[0, 0] = 255
    col = colour_labels(label)
    assert col[15, 15].tolist() == [192, 128, 128] and col[0, 0].tolist() == [224, 224, 192] and col[30, 40].tolist() == [0, 0, 0]
    rows = [{"id": f"img{i}", "photo": rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), "cam": rng.random((40, 50)),
             "pacam": None, "pseudo": label, "gt": label} for i in range(2)]
    assert_png(image_grid(rows, tmp_path / "grid.png"))


def test_bank_plot_marks_context(tmp_path):
    rng = np.random.default_rng(1)
    bank = PrototypeBank(3, 8, capacity=50, num_clusters=4, spherical=False)
    for i in range(60):
        c = i % 2
        bank.push(i, [c], rng.normal(loc=3 * c, size=(1, 8)))
    assert bank.cluster("e") is not None
    assert_png(bank_plot(bank.state_dict(), ["a", "b", "c"], tmp_path / "bank.png"))


def test_pca_projects_onto_the_main_axis():
    x = np.zeros((4, 3))
    x[:, 1] = [-2, -1, 1, 2]
    xy = pca_2d(x)
    assert np.allclose(np.abs(xy[:, 0]), [2, 1, 1, 2])


def test_bars_and_curves(tmp_path):
    res = {"baseline": {"iou": [0.7, 0.2, np.nan], "best_miou": 0.45, "thresholds": [0.1, 0.2], "miou": [0.4, 0.45],
                        "best_threshold": 0.2},
           "cpal": {"iou": [0.75, 0.3, 0.1], "best_miou": 0.38, "thresholds": [0.1, 0.2], "miou": [0.38, 0.3],
                    "best_threshold": 0.1}}
    assert_png(iou_bars(res, ["cat", "dog"], tmp_path / "bars.png"))
    assert_png(miou_curves(res, tmp_path / "curves.png"))


def test_diagnostic_curves_take_ray_and_local_histories(tmp_path):
    cpal = [{"epoch": e, "bce": 0.6 - 0.1 * e, "self": 0.02 * e, "self_class_share": 0.5 * e, "bank_fill": [3, 5],
             "classes_below_k": [0] if e == 0 else [], "diag_cam_miou": 0.2 + 0.05 * e, "diag_pacam_miou": 0.1}
            for e in range(3)]
    base = [{"epoch": e, "bce": 0.6 - 0.1 * e, "self": 0.0, "bank_fill": float("nan"), "classes_below_k": float("nan"),
             "diag_pacam_miou": float("nan")} for e in range(3)]  # a Ray table row: NaN where the run had nothing
    assert _series(cpal, "bank_fill_mean") == ([0, 1, 2], [4.0, 4.0, 4.0])
    assert _series(cpal, "classes_below_k_count") == ([0, 1, 2], [1.0, 0.0, 0.0])
    assert _series(base, "bank_fill_mean") == ([], []) and _series(base, "diag_pacam_miou") == ([], [])
    assert_png(diagnostic_curves({"baseline": base, "cpal": cpal}, tmp_path / "diag.png"))
