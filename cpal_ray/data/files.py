"""Reading a dataset's files with errors that name them: images, masks, label PNGs and id lists.

Every reader raises ``DataError`` (a ``ValueError``) naming the file, and the sample id where there
is one, for a file that is missing, does not decode, claims more than ``data.max_image_pixels``
pixels in its header (checked before decoding: a decompression bomb is a bad sample), or holds
something else than it should. A class map (a ground-truth mask or a label PNG written by a
stage) holds 0 background, 1..N classes and 255 ignore, and has the size of its image.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cpal_ray.data.transforms import IGNORE_INDEX
from cpal_ray.storage import location

# File extensions an id list's entries may carry (stripped: ``x.jpg`` is the id ``x``).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


class DataError(ValueError):
    """A sample or data file is unusable; the message names the file and the sample id."""


# The most pixels an image or label file may claim in its header (data.max_image_pixels, set by
# ``set_max_image_pixels`` when a dataset is built): checked before anything is decoded, so a
# decompression bomb (a small file that decodes to gigabytes) is a bad sample naming its file.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
_max_pixels = [DEFAULT_MAX_IMAGE_PIXELS]


def set_max_image_pixels(limit: int) -> None:
    """The limit of ``open_image`` in this process; PIL's own check (it refuses twice its limit at
    open) is set to the same number."""
    _max_pixels[0] = int(limit)
    Image.MAX_IMAGE_PIXELS = int(limit)


def _of(sample_id: str | None) -> str:
    return f" (id {sample_id})" if sample_id is not None else ""


@contextlib.contextmanager
def open_image(source, path, what: str = "image", sample_id: str | None = None):
    """``PIL.Image.open(source)`` (a path or a file object) whose header size is checked first:
    DataError naming ``path`` (and the id) when it claims more than data.max_image_pixels pixels.
    Other errors of ``Image.open`` are the caller's to handle, as without it."""
    of = _of(sample_id)
    try:
        with warnings.catch_warnings():  # over the limit: refused below, with the file's name
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: {what} too large to decode, a decompression bomb?{of} ({e})") from None
    with im:
        width, height = im.size
        if width * height > _max_pixels[0]:
            raise DataError(f"{path}: {what} of {width}x{height} pixels is over data.max_image_pixels="
                        f"{_max_pixels[0]} (a decompression bomb?){of}")
        yield im


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Ids in a split file, one per line; blank lines and ``#`` comments skipped.

    Lines holding paths (DeepLab style ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``) give
    the file name of their first token without its image extension; any other id is kept as
    written, dots included (``img.v2`` is ``img.v2``, ``img.v2.jpg`` is ``img.v2``).
    """
    ids = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = line.split()[0].rsplit("/", 1)[-1]
            stem, dot, ext = name.rpartition(".")
            ids.append(stem if dot and stem and ext.lower() in IMAGE_EXTENSIONS else name)
    return ids


def read_rgb(path: Path, sample_id: str) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3); DataError naming file and id if unreadable."""
    try:
        with open_image(path, path, "image", sample_id) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: image file missing (id {sample_id})") from e
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image (id {sample_id}): {e}") from e


def read_image_hw(path: Path, sample_id: str) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding it; DataError naming file and id."""
    try:
        with open_image(path, path, "image", sample_id) as im:
            return im.size[1], im.size[0]
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image header (id {sample_id}): {e}") from e


def decode_class_map(source, path, what: str, modes: tuple[str, ...], sample_id: str | None = None,
                     dtype=None) -> np.ndarray:
    """The (H, W) array of a single-channel image (a path or a file object) of one of ``modes``;
    DataError naming ``path`` (and the id) when it does not decode or is of another mode."""
    try:
        with open_image(source, path, what, sample_id) as im:
            im.load()
            if im.mode not in modes:
                raise DataError(f"{path}: {what} has mode {im.mode!r}, expected class indices in a palette ('P') "
                                f"or greyscale PNG{_of(sample_id)}")
            return np.array(im, dtype=dtype)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode {what}{_of(sample_id)}: {e}") from e


def check_class_map(arr: np.ndarray, path, what: str, sample_id: str | None = None, num_classes: int | None = None,
                    hw: tuple[int, int] | None = None, image_path=None) -> np.ndarray:
    """``arr`` when it is of size ``hw`` and holds only 0..num_classes and 255 (a check is skipped
    when its bound is None); DataError naming ``path`` (its image, the id) otherwise."""
    if hw is not None and arr.shape != tuple(hw):
        image = f" ({image_path})" if image_path else ""
        raise DataError(f"{path}: {what} size {arr.shape} differs from its image's shape {tuple(hw)}{image}"
                        f"{_of(sample_id)}")
    if num_classes is not None:
        bad = (arr > num_classes) & (arr != IGNORE_INDEX)
        if bad.any():
            raise DataError(f"{path}: {what} values {np.unique(arr[bad])[:8].tolist()} outside 0..{num_classes} "
                            f"and 255{_of(sample_id)}")
    return arr


def read_mask(path: Path, sample_id: str, num_classes: int, image_hw: tuple[int, int],
              image_path: Path | None = None) -> np.ndarray:
    """A ground-truth class-index PNG (mode P/L/I) -> (H, W) array with values in {0..N, 255};
    DataError naming the file and id when it does not decode, is a colour image, has another
    size than its image (H, W) = image_hw, or holds values outside {0..N, 255}."""
    mask = decode_class_map(path, path, "mask", ("P", "L", "I", "I;16"), sample_id)
    return check_class_map(mask, path, "mask", sample_id, num_classes, image_hw, image_path)


def decode_label_png(data: bytes, path, sample_id: str | None = None, num_classes: int | None = None,
                     hw: tuple[int, int] | None = None) -> np.ndarray:
    """A label PNG's bytes (a stage's output, or a VOC ``SegmentationClass`` file) -> (H, W) uint8
    palette indices; DataError naming ``path`` (and the id) when it does not decode, is not a
    palette or greyscale image, or (where given) is not of size ``hw`` or holds values above
    ``num_classes`` other than 255."""
    label = decode_class_map(io.BytesIO(data), path, "label PNG", ("P", "L"), sample_id, np.uint8)
    return check_class_map(label, path, "label", sample_id, num_classes, hw)


def read_label_png(path, sample_id: str | None = None, num_classes: int | None = None,
                   hw: tuple[int, int] | None = None) -> np.ndarray:
    """``decode_label_png`` of the file at ``path`` (local path, URI or ``Location``); a file that
    cannot be read is a DataError naming it."""
    try:
        data = location(path).read_bytes()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read label PNG{_of(sample_id)}: {e}") from e
    return decode_label_png(data, path, sample_id, num_classes, hw)
