"""Training items whose masks come from a folder of label PNGs: the pseudo-labels of a run.

The refine stages train on what the earlier stages wrote: the boundary network on the confident
CRF seeds (``workflows.pseudo_labels``, 255 = unknown), the segmentation network on the pseudo
masks (``workflows.make_masks``). ``LabelFolderDataset`` keeps the images and image-level labels
of a dataset split and reads ``<label_dir>/<id>.png`` as each image's mask (local path or URI);
its transform (``TrainTransform``) crops image and mask together, padding the mask with 255.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cpal_ray.data.base import SampleDataset
from cpal_ray.data.files import DataError, read_image_hw, read_label_png, read_rgb
from cpal_ray.data.transforms import IGNORE_INDEX
from cpal_ray.storage import location

log = logging.getLogger(__name__)


class LabelFolderDataset(SampleDataset):
    """The images of ``base`` (a dataset split) with ``<label_dir>/<id>.png`` as their masks.

    Args:
        base: a dataset of the split (its ``read`` gives the photo and image-level label).
        label_dir: folder of label PNGs (local path or URI), values 0..N and 255.
        transform: paired transform of the items (``TrainTransform`` for training).
        on_bad_sample: an id without a PNG raises DataError naming the folder ("error"), or is
            left out and listed in ``skipped`` ("skip"); an unreadable PNG raises on read.
    """

    def __init__(self, base: SampleDataset, label_dir, transform=None, seed: int = 0, on_bad_sample: str = "error"):
        super().__init__(transform, return_rgb=False, seed=seed)
        self.base, self.label_dir = base, location(label_dir)
        self.num_classes, self.class_names = base.num_classes, base.class_names
        if not self.label_dir.is_dir():
            raise DataError(f"{self.label_dir}: no such label folder")
        present = {p.name[:-4] for p in self.label_dir.list(".png")}
        self._index = {}
        missing = []
        for i, sid in enumerate(base.ids):
            if sid in present:
                self._index[sid] = i
            else:
                missing.append(sid)
        if missing and on_bad_sample == "error":
            raise DataError(f"{self.label_dir}: no label PNG for {len(missing)} of {len(base.ids)} ids "
                            f"(first: {missing[:5]}); finish that stage or set data.on_bad_sample=skip")
        self.skipped = [(sid, f"{self.label_dir / (sid + '.png')}: missing") for sid in missing]
        if missing:
            log.warning("%s: %d ids without a label PNG left out (first: %s)", self.label_dir, len(missing), missing[:5])
        self.ids = list(self._index)
        if not self.ids:
            raise DataError(f"{self.label_dir}: none of the {len(base.ids)} ids has a label PNG")

    def read(self, index: int):
        sid = self.ids[index]
        rgb, _, label = self.base.read(self._index[sid])
        return rgb, read_label_png(self.label_dir / f"{sid}.png", sid, self.num_classes, rgb.shape[:2]), label

    def label_of(self, index: int) -> np.ndarray:
        return self.base.label_of(self._index[self.ids[index]])


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolderDataset(SampleDataset):
    """The user's own photos: every image file of a local folder (``IMAGE_SUFFIXES``, any case),
    ids = file stems, sorted. No masks (all 255) and no image-level labels (all zero): what a
    trained segmenter predicts on (``workflows.predict``). DataError names the folder when it
    holds no image, or two files share a stem."""

    def __init__(self, folder, num_classes: int, class_names, transform=None):
        super().__init__(transform, return_rgb=False)
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: no such image folder")
        files = sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        self._paths: dict = {}
        for p in files:
            if p.stem in self._paths:
                raise DataError(f"{self.folder}: {self._paths[p.stem].name} and {p.name} share the id {p.stem!r}")
            self._paths[p.stem] = p
        if not self._paths:
            raise DataError(f"{self.folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.ids = list(self._paths)
        self.num_classes, self.class_names = int(num_classes), tuple(class_names)

    def image_path(self, sample_id: str):
        return self._paths[sample_id]

    def image_size(self, index: int) -> tuple[int, int]:
        sid = self.ids[index]
        return read_image_hw(self._paths[sid], sid)

    def read(self, index: int):
        sid = self.ids[index]
        rgb = read_rgb(self._paths[sid], sid)
        return rgb, np.full(rgb.shape[:2], IGNORE_INDEX, np.uint8), np.zeros(self.num_classes, np.float32)

    def label_of(self, index: int) -> np.ndarray:
        return np.zeros(self.num_classes, np.float32)
