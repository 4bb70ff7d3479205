"""PASCAL VOC 2012 reader (the layout of VOCdevkit/VOC2012 and of the bundled voc-mini).

    <root>/JPEGImages/<id>.jpg
    <root>/<mask_dir>/<id>.png                 optional; 0 bg, 1..20 classes, 255 ignore
    <root>/ImageSets/Segmentation/<split>.txt  or <root>/<split>.txt, or a path to a .txt
    <root>/cls_labels.json or cls_labels.npy   or DataConfig.cls_labels; else the packaged
                                               VOC 2012 labels ("bundled:voc12", with a WARNING)

Label files from the public WSSS code bases key ids as ints (``2007000032``); others use the id
string (``2007_000032``). Both spellings, in the labels and in the id lists, are normalised to
the string form by ``normalize_voc_id``.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from cpal_ray.data.assets import VOC12_META_DIR, resolve_root_path
from cpal_ray.data.base import FileDataset
from cpal_ray.data.files import DataError, read_id_list
from cpal_ray.data.classes import VOC_CLASSES
from cpal_ray.data.labels import find_labels_file, load_label_dict
from cpal_ray.data.transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)

_INT_ID = re.compile(r"^(\d{4})_?(\d{6})$")


def normalize_voc_id(key) -> str:
    """``2007000032``, ``"2007000032"`` or ``"2007_000032"`` -> ``"2007_000032"``; ids of another
    form (``"c128_000000000030"``) are returned as strings, unchanged."""
    text = str(key).strip()
    m = _INT_ID.match(text)
    return f"{m.group(1)}_{m.group(2)}" if m else text


def find_split_file(root: Path, split: str) -> Path:
    """The id list of ``split``: a path to a .txt, ``<root>/<split>.txt``,
    ``<root>/ImageSets/Segmentation/<split>.txt``, else the packaged VOC 2012 list of that name.
    DataError listing the places tried when none exists."""
    tried = []
    if split.endswith(".txt"):
        tried += [Path(split).expanduser(), root / split]
    else:
        tried += [root / f"{split}.txt", root / "ImageSets" / "Segmentation" / f"{split}.txt",
                  VOC12_META_DIR / f"{split}.txt"]
    for p in tried:
        if p.is_file():
            if p.parent == VOC12_META_DIR:
                log.info("VOC: %s has no %s list; using the packaged VOC 2012 list %s", root, split, p)
            return p
    raise DataError(f"split {split!r}: no id list found; tried {', '.join(map(str, tried))}")


class VOCSegmentation(FileDataset):
    """PASCAL VOC 2012 images with image-level labels and (optional) masks; N = 20.

    Args:
        root: dataset folder (or ``"bundled:voc-mini"``).
        split: id-list name (``train``, ``train_aug``, ``val``) or path to a .txt.
        cls_labels: labels file or ``bundled:`` name; "" = ``<root>/cls_labels.json`` or ``.npy``,
            else the packaged VOC 2012 labels (a WARNING names them; ``labels_source`` records them).
        mask_dir: mask folder under root (``SegmentationClassAug`` for train_aug).
        transform: a preset from ``cpal_ray.data.transforms`` (default EvalTransform).
        return_rgb: add the uint8 photo (H, W, 3) to items.
        on_bad_sample: "error" raises DataError on a bad id; "skip" drops ids with a missing
            image, missing label or no positive label (recorded in ``skipped``).
        seed: augmentation seed (see ``SampleDataset``).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, cls_labels: str = "",
                 mask_dir: str = "SegmentationClass", transform=None, return_rgb: bool = False,
                 on_bad_sample: str = "error", seed: int = 0):
        super().__init__(len(VOC_CLASSES), VOC_CLASSES, transform, return_rgb, seed, on_bad_sample)
        self.root = resolve_root_path(root)
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"{self.root / 'JPEGImages'}: not found; root must be a VOC2012-style folder")
        self.split = split
        self.mask_dir = mask_dir
        split_file = find_split_file(self.root, split)
        ids = [normalize_voc_id(i) for i in read_id_list(split_file)]
        labels_file = find_labels_file(self.root, cls_labels, fallback=VOC12_META_DIR / "cls_labels.npy", reader="VOC")
        labels = load_label_dict(labels_file, normalize_voc_id)
        self._select_ids(ids, labels, normalize_voc_id, labels_file, str(split_file))

    @classmethod
    def from_config(cls, data_cfg, split: str, train: bool, return_rgb: bool = False) -> "VOCSegmentation":
        """Build from a ``DataConfig``; ``split`` is the list name (e.g. data_cfg.train_split)."""
        transform = TrainTransform.from_config(data_cfg) if train else EvalTransform()
        return cls(data_cfg.root, split, cls_labels=data_cfg.cls_labels, mask_dir=data_cfg.mask_dir or "SegmentationClass",
                   transform=transform, return_rgb=return_rgb, on_bad_sample=data_cfg.on_bad_sample,
                   seed=data_cfg.seed)

    def image_path(self, sample_id: str) -> Path:
        return self.root / "JPEGImages" / f"{sample_id}.jpg"

    def mask_path(self, sample_id: str) -> Path:
        return self.root / self.mask_dir / f"{sample_id}.png"
