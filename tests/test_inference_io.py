"""Label PNG and CAM npz files (cpal_ray.inference.io): round trips, validation, atomic writes."""
import numpy as np
import pytest
from PIL import Image

from cpal_ray.inference import io as iio
from cpal_ray.inference.io import (CamFileError, LabelFileError, load_cams_npz, load_label_png, save_cams_npz,
                                   save_label_png)

pytestmark = pytest.mark.unit


def _label(rng, shape=(17, 23)):
    lab = rng.integers(0, 21, size=shape).astype(np.uint8)
    lab[:2] = 255
    return lab


def test_label_png_round_trip_with_voc_palette(tmp_path):
    lab = _label(np.random.default_rng(0))
    path = save_label_png(tmp_path / "sub" / "a.png", lab)
    with Image.open(path) as im:
        assert im.mode == "P"
        pal = im.getpalette()
    assert pal[0:3] == [0, 0, 0] and pal[3:6] == [128, 0, 0] and pal[15 * 3:16 * 3] == [192, 128, 128]
    assert pal[255 * 3:256 * 3] == [224, 224, 192]
    out = load_label_png(path, expected_shape=lab.shape)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, lab)


def test_label_png_validation(tmp_path):
    with pytest.raises(ValueError):
        save_label_png(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError):
        save_label_png(tmp_path / "x.png", np.full((2, 2), 300))
    # int64 labels within 0..255 are accepted
    save_label_png(tmp_path / "ok.png", np.array([[0, 255]], dtype=np.int64))
    Image.new("RGB", (4, 3)).save(tmp_path / "rgb.png")
    with pytest.raises(LabelFileError, match="rgb.png"):
        load_label_png(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(LabelFileError, match="junk.png"):
        load_label_png(tmp_path / "junk.png")
    with pytest.raises(LabelFileError, match="shape"):
        load_label_png(tmp_path / "ok.png", expected_shape=(2, 2))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cams_npz_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(1)
    cams = rng.random((3, 13, 7)).astype(np.float32)
    classes = np.array([0, 5, 19])
    path = save_cams_npz(tmp_path / "c.npz", classes, cams, dtype)
    got_classes, got = load_cams_npz(path, expected_classes=[0, 5, 19])
    assert got_classes.dtype == np.int64 and got_classes.tolist() == [0, 5, 19]
    assert got.dtype == np.float32 and got.shape == (3, 13, 7)
    np.testing.assert_allclose(got, cams, atol=1e-3 if dtype == "float16" else 0)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["cams", "classes", "size"]
        assert npz["cams"].dtype == np.dtype(dtype) and npz["size"].tolist() == [13, 7]


def test_cams_npz_no_positive_class(tmp_path):
    save_cams_npz(tmp_path / "e.npz", np.zeros(0, np.int64), np.zeros((0, 4, 5)))
    classes, cams = load_cams_npz(tmp_path / "e.npz")
    assert classes.shape == (0,) and cams.shape == (0, 4, 5)


def test_save_cams_npz_validation(tmp_path):
    with pytest.raises(ValueError):
        save_cams_npz(tmp_path / "a.npz", [0, 1], np.zeros((3, 2, 2)))
    with pytest.raises(ValueError):
        save_cams_npz(tmp_path / "a.npz", [0], np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError):
        save_cams_npz(tmp_path / "a.npz", [0], np.zeros((1, 2, 2)), dtype="int8")
    assert list(tmp_path.iterdir()) == []


def _good_file(tmp_path):
    return save_cams_npz(tmp_path / "good.npz", [2, 7], np.random.default_rng(0).random((2, 20, 30)))


def test_corrupt_and_truncated_npz_name_the_path(tmp_path):
    data = _good_file(tmp_path).read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 100)
    for name in ("trunc.npz", "junk.npz", "missing.npz"):
        with pytest.raises(CamFileError, match=name):
            load_cams_npz(tmp_path / name)
    assert issubclass(CamFileError, ValueError)


def test_inconsistent_npz_contents(tmp_path):
    np.savez(tmp_path / "nokeys.npz", cams=np.zeros((1, 2, 2), np.float16))
    with pytest.raises(CamFileError, match="nokeys.npz.*missing keys"):
        load_cams_npz(tmp_path / "nokeys.npz")
    np.savez(tmp_path / "shape.npz", classes=np.array([1, 2]), cams=np.zeros((2, 3, 3), np.float16),
             size=np.array([3, 4]))
    with pytest.raises(CamFileError, match="shape.npz"):
        load_cams_npz(tmp_path / "shape.npz")
    np.savez(tmp_path / "obj.npz", classes=np.array([1], dtype=object), cams=np.zeros((1, 2, 2)),
             size=np.array([2, 2]))
    with pytest.raises(CamFileError, match="obj.npz"):
        load_cams_npz(tmp_path / "obj.npz")
    path = _good_file(tmp_path)
    with pytest.raises(CamFileError, match="good.npz.*expected"):
        load_cams_npz(path, expected_classes=[2, 8])


def test_atomic_writes_leave_no_temp_files(tmp_path):
    path = _good_file(tmp_path)
    save_label_png(tmp_path / "l.png", np.zeros((3, 3), np.uint8))
    save_cams_npz(path, [1], np.zeros((1, 4, 4)))  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.npz", "l.png"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = _good_file(tmp_path)
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04partial")
        raise OSError("disk full")

    monkeypatch.setattr(iio.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_cams_npz(path, [1], np.zeros((1, 4, 4)))
    with pytest.raises(OSError):
        save_cams_npz(tmp_path / "new.npz", [1], np.zeros((1, 4, 4)))
    assert [p.name for p in tmp_path.iterdir()] == ["good.npz"]
    assert path.read_bytes() == before
