"""Files written by inference: palette label PNGs and CAM ``.npz`` files.

Paths are local paths, URIs or ``cpal_ray.storage.Location`` objects. Every writer is atomic
(``Location.write_bytes``: a temporary file renamed into place, or one object upload), so a
reader (or a re-run after a crash) never sees a partial file under the final name. Readers
validate what they load and raise an error naming the path, because a truncated file from an
interrupted run is the usual failure.

CAM files hold plain arrays only (no pickle): ``classes`` (K,) int64 foreground class indices
in 0..N-1, ``cams`` (K, H, W) float16/float32 maps in [0, 1], ``size`` (2,) int64 = (H, W).
"""
from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image

from cpal_ray.data.classes import voc_palette
from cpal_ray.data.files import DataError as LabelFileError, read_label_png  # the name inference's callers catch
from cpal_ray.storage import Location, location

CAM_KEYS = ("classes", "cams", "size")


class CamFileError(ValueError):
    """A CAM ``.npz`` file is unreadable, truncated or inconsistent; the message names the path."""


# Flat [r0, g0, b0, r1, ...] (768,) for PIL.putpalette; index 255 is (224, 224, 192).
VOC_PALETTE = voc_palette().reshape(-1).tolist()


def atomic_write_bytes(path, data: bytes) -> Location:
    """Write ``data`` to ``path`` (local path, URI or ``Location``) atomically; returns its Location."""
    return location(path).write_bytes(data)


# ---------------------------------------------------------------------------- label PNGs


def encode_label_png(label: np.ndarray, palette: list[int] | None = None) -> bytes:
    """A label map as the bytes of a palette ('P') PNG with the VOC colours.

    label: (H, W) integer array with values in 0..255 (0 background, 1..N classes, 255 ignore).
    palette: flat RGB list (<= 768 values); default the VOC palette.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {label.shape}")
    if label.dtype != np.uint8:
        if not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"label must be an integer array, got {label.dtype}")
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"label values must be in 0..255, got [{label.min()}, {label.max()}]")
        label = label.astype(np.uint8)
    im = Image.fromarray(np.ascontiguousarray(label))  # mode 'L'; putpalette turns it into 'P'
    im.putpalette(VOC_PALETTE if palette is None else palette)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def save_label_png(path, label: np.ndarray, palette: list[int] | None = None) -> Location:
    """Save a label map as a palette PNG (``encode_label_png``), atomically."""
    try:
        data = encode_label_png(label, palette)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return atomic_write_bytes(path, data)


def load_label_png(path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label PNG written by ``save_label_png`` (or a VOC ``SegmentationClass`` file).

    Returns (H, W) uint8 palette indices. Raises ``LabelFileError`` (the data layer's DataError)
    naming the path when the file is missing, unreadable, not a 'P' or 'L' image, or not of
    ``expected_shape`` (H, W): ``cpal_ray.data.files.read_label_png``.
    """
    return read_label_png(path, hw=expected_shape)


# ---------------------------------------------------------------------------- CAM npz


def save_cams_npz(path, classes: np.ndarray, cams: np.ndarray, dtype: str | np.dtype = "float16") -> Location:
    """Save one image's CAMs atomically as an uncompressed ``.npz`` of plain arrays.

    classes: (K,) int, the positive foreground classes in 0..N-1 (K may be 0);
    cams: (K, H, W) float maps; dtype: storage dtype ("float16" or "float32").
    Stored keys: ``classes`` (K,) int64, ``cams`` (K, H, W) dtype, ``size`` (2,) int64 = (H, W).
    """
    classes = np.asarray(classes)
    cams = np.asarray(cams)
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32):
        raise ValueError(f"{path}: dtype must be float16 or float32, got {dtype}")
    if classes.ndim != 1 or (classes.size and not np.issubdtype(classes.dtype, np.integer)):
        raise ValueError(f"{path}: classes must be a 1-D integer array, got {classes.dtype} {classes.shape}")
    if cams.ndim != 3 or cams.shape[0] != classes.shape[0]:
        raise ValueError(f"{path}: cams must be (K={classes.shape[0]}, H, W), got {cams.shape}")
    if not np.all(np.isfinite(cams)):
        raise ValueError(f"{path}: cams contain non-finite values")
    arrays = {
        "classes": classes.astype(np.int64),
        "cams": cams.astype(dtype),
        "size": np.asarray(cams.shape[1:], dtype=np.int64),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_cams_npz(path, expected_classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a file written by ``save_cams_npz``; never unpickles.

    expected_classes: optional (K,) ints the file must hold (e.g. the image's positive labels).
    Returns (classes (K,) int64, cams (K, H, W) float32). Raises ``CamFileError`` naming the path
    on a missing, corrupt or truncated file, missing keys, inconsistent shapes, non-finite values
    or classes different from ``expected_classes``.
    """
    try:
        with np.load(io.BytesIO(location(path).read_bytes()), allow_pickle=False) as npz:
            missing = [k for k in CAM_KEYS if k not in npz.files]
            if missing:
                raise CamFileError(f"{path}: missing keys {missing} (has {sorted(npz.files)})")
            classes, cams, size = (npz[k] for k in CAM_KEYS)
    except CamFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CamFileError(f"{path}: cannot read CAM file ({type(e).__name__}: {e})") from e
    if classes.ndim != 1 or not (np.issubdtype(classes.dtype, np.integer) or classes.size == 0):
        raise CamFileError(f"{path}: 'classes' must be a 1-D integer array, got {classes.dtype} {classes.shape}")
    if size.shape != (2,):
        raise CamFileError(f"{path}: 'size' must be (2,), got {size.shape}")
    expected_shape = (classes.shape[0], int(size[0]), int(size[1]))
    if cams.shape != expected_shape:
        raise CamFileError(f"{path}: 'cams' shape {cams.shape} != (K, H, W) = {expected_shape}")
    if not np.issubdtype(cams.dtype, np.floating) or not np.all(np.isfinite(cams)):
        raise CamFileError(f"{path}: 'cams' must be finite floats, got {cams.dtype}")
    classes = classes.astype(np.int64)
    if expected_classes is not None:
        expected = np.asarray(expected_classes, dtype=np.int64).reshape(-1)
        if not np.array_equal(classes, expected):
            raise CamFileError(f"{path}: classes {classes.tolist()} != expected {expected.tolist()}")
    return classes, cams.astype(np.float32)


# ------------------------------------------------------------------ where a CAM folder keeps its files

PACAM_DIR = "pacam"  # the PACAM files of a CAM folder live in this subfolder


def source_dir(cam_dir, source: str = "cam") -> Location:
    """The folder of one map's files: ``<cam_dir>`` for the CAM, ``<cam_dir>/pacam`` for the PACAM."""
    return location(cam_dir) / PACAM_DIR if source == "pacam" else location(cam_dir)


def cam_path(cam_dir, sample_id: str, source: str = "cam") -> Location:
    """``<cam_dir>/<id>.npz`` for the CAM, ``<cam_dir>/pacam/<id>.npz`` for the PACAM."""
    return source_dir(cam_dir, source) / f"{sample_id}.npz"

