"""COCO 2014 in the layout the WSSS code bases use, and a converter from the official JSON.

    <root>/train2014/COCO_train2014_<12 digits>.jpg   (and val2014/)
    <root>/mask/{train2014,val2014}/<id>.png           0 bg, 1..80 classes, 255 ignore (optional)
    <root>/cls_labels.json (or .npy)                   id -> multi-hot over the 80 classes
    <root>/<split>.txt or <root>/<split>_id.txt        one id per line

Ids are image file stems (``COCO_train2014_000000000009``). Labels may be keyed by that stem,
by the bare number string (``"000000000009"``) or by the int image id (``9``): all are matched
through the trailing number, which is unique across train2014 and val2014.

Class k (1..80) is the k-th of the 80 official category ids (1..90, sparse) in increasing order.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from cpal_ray.data.assets import resolve_root_path
from cpal_ray.data.base import FileDataset
from cpal_ray.data.files import DataError, read_id_list
from cpal_ray.data.classes import COCO_CLASSES, colorize
from cpal_ray.data.labels import (LABEL_FILE_NAMES, find_labels_file, load_label_dict, read_label_file,
                                  write_labels_json)
from cpal_ray.data.transforms import IGNORE_INDEX, EvalTransform, TrainTransform

log = logging.getLogger(__name__)

# The 80 official COCO category ids, increasing; class k (1..80) is COCO_CATEGORY_IDS[k - 1].
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
_SPLIT_DIRS = {"train": "train2014", "val": "val2014"}
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def coco_key(key):
    """Label-dict key of an id: its trailing number as int (``COCO_val2014_000000000042``,
    ``"000000000042"`` and ``42`` -> 42); a key without one is returned as a string."""
    m = _TRAILING_NUMBER.search(str(key).strip())
    return int(m.group(1)) if m else str(key).strip()


class COCOSegmentation(FileDataset):
    """COCO 2014 images with image-level labels and (optional) masks; N = 80.

    Args:
        root: dataset folder in the layout above.
        split: ``train`` / ``val`` (list ``<root>/<split>.txt`` or ``<split>_id.txt``, images in
            ``<split>2014/``) or a path to a .txt.
        cls_labels: labels file; "" = ``<root>/cls_labels.json``, else ``<root>/cls_labels.npy``.
        mask_dir: mask folder under root; ``<mask_dir>/<split>2014/`` is tried first, then
            ``<mask_dir>/``, then ``mask/<split>2014/``.
        transform, return_rgb, on_bad_sample, seed: as for ``VOCSegmentation``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, cls_labels: str = "",
                 mask_dir: str = "mask", transform=None, return_rgb: bool = False,
                 on_bad_sample: str = "error", seed: int = 0):
        super().__init__(len(COCO_CLASSES), COCO_CLASSES, transform, return_rgb, seed, on_bad_sample)
        self.root = resolve_root_path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: COCO root folder not found")
        self.split, self.mask_dir = split, mask_dir
        split_file = self._split_file(split)
        labels_file = find_labels_file(self.root, cls_labels)
        labels = load_label_dict(labels_file, coco_key)
        self._paths: dict[str, Path] = {}
        self._select_ids(read_id_list(split_file), labels, coco_key, labels_file, str(split_file))

    @classmethod
    def from_config(cls, data_cfg, split: str, train: bool, return_rgb: bool = False) -> "COCOSegmentation":
        """Build from a ``DataConfig``; an empty mask_dir means the COCO default "mask"."""
        transform = TrainTransform.from_config(data_cfg) if train else EvalTransform()
        mask_dir = data_cfg.mask_dir or "mask"
        return cls(data_cfg.root, split, cls_labels=data_cfg.cls_labels, mask_dir=mask_dir,
                   transform=transform, return_rgb=return_rgb, on_bad_sample=data_cfg.on_bad_sample,
                   seed=data_cfg.seed)

    def _split_file(self, split: str) -> Path:
        tried = ([Path(split).expanduser(), self.root / split] if split.endswith(".txt")
                 else [self.root / f"{split}.txt", self.root / f"{split}_id.txt"])
        for p in tried:
            if p.is_file():
                return p
        raise DataError(f"split {split!r}: no id list found; tried {', '.join(map(str, tried))}")

    def _image_dirs(self, sample_id: str) -> list[str]:
        m = re.match(r"COCO_(\w+?2014)_", sample_id)
        if m:
            return [m.group(1)]
        first = _SPLIT_DIRS.get(self.split)
        return [first] + [d for d in _SPLIT_DIRS.values() if d != first] if first else list(_SPLIT_DIRS.values())

    def image_path(self, sample_id: str) -> Path:
        if sample_id in self._paths:
            return self._paths[sample_id]
        candidates = []
        for d in self._image_dirs(sample_id):
            candidates.append(self.root / d / f"{sample_id}.jpg")
            if sample_id.isdigit():
                candidates.append(self.root / d / f"COCO_{d}_{int(sample_id):012d}.jpg")
        found = next((p for p in candidates if p.is_file()), candidates[0])
        self._paths[sample_id] = found
        return found

    def mask_path(self, sample_id: str) -> Path:
        d = self.image_path(sample_id).parent.name
        stem = self.image_path(sample_id).stem
        candidates = [self.root / self.mask_dir / d / f"{stem}.png", self.root / self.mask_dir / f"{stem}.png",
                      self.root / "mask" / d / f"{stem}.png"]
        return next((p for p in candidates if p.is_file()), candidates[0])


# ------------------------------------------------------------------------------------ converter

def annotation_mask(seg, height: int, width: int, ann_id=None) -> np.ndarray:
    """One COCO segmentation -> bool mask (H, W), decoded by pycocotools (the COCO API's own
    rasteriser): a list of polygons, an uncompressed RLE (``counts`` a list) or a compressed one."""
    from pycocotools import mask as mask_utils  # an optional package, needed for COCO only

    if isinstance(seg, list):
        polygons = [p for p in seg if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(seg, dict):
        size = tuple(int(v) for v in seg["size"])
        if size != (height, width):
            raise DataError(f"annotation {ann_id}: RLE size {size} != image {(height, width)}")
        counts = seg["counts"]
        if isinstance(counts, list):
            if min(counts, default=0) < 0 or sum(counts) != height * width:
                raise DataError(f"annotation {ann_id}: RLE counts sum to {sum(counts)}, expected "
                                f"{height}x{width}={height * width}")
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise DataError(f"annotation {ann_id}: unknown segmentation type {type(seg).__name__}")
    return mask_utils.decode(rle).astype(bool)


def rasterize_annotations(anns: list[dict], height: int, width: int, cat_to_class: dict[int, int]) -> np.ndarray:
    """Class mask uint8 (H, W) of one image's annotations.

    Crowd regions (``iscrowd=1``) become 255 first; object regions are then painted from the
    largest to the smallest (so small objects stay visible) with their class 1..80 and win over
    crowd pixels.
    """
    canvas = np.zeros((height, width), dtype=np.uint8)
    crowd = [a for a in anns if a.get("iscrowd", 0)]
    objects = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -float(a.get("area", 0.0)))
    for ann in crowd + objects:
        value = IGNORE_INDEX if ann.get("iscrowd", 0) else cat_to_class[ann["category_id"]]
        canvas[annotation_mask(ann.get("segmentation"), height, width, ann.get("id"))] = value
    return canvas


def convert_instances(instances_json: str | os.PathLike, out_root: str | os.PathLike, split: str = "train") -> dict:
    """Official ``instances_<split>2014.json`` -> WSSS layout under ``out_root``.

    Writes ``mask/<split>2014/<stem>.png`` (palette PNG, values 0/1..80/255),
    ``<split>.txt`` (ids = image file stems, images with no annotation left out) and merges the
    labels into ``cls_labels.json`` (stem -> multi-hot over the 80 classes; the entries of other
    images already in the folder's label file, JSON or npy, are kept). Crowd categories count as present in the label. Returns counts:
    ``{"images", "written", "no_annotations", "crowd"}``.
    """
    if split not in _SPLIT_DIRS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_DIRS)}, got {split!r}")
    src = Path(instances_json)
    try:
        data = json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{src}: cannot read COCO instances JSON: {e}") from e
    cat_to_class = {cid: k + 1 for k, cid in enumerate(COCO_CATEGORY_IDS)}
    for cat in data.get("categories", []):
        k = cat_to_class.get(cat["id"])
        if k is None or COCO_CLASSES[k - 1] != cat.get("name"):
            raise DataError(f"{src}: category {cat.get('id')} {cat.get('name')!r} is not one of the 80 "
                            "COCO 2014 categories")
    by_image = defaultdict(list)
    for ann in data.get("annotations", []):
        if ann["category_id"] not in cat_to_class:
            raise DataError(f"{src}: annotation {ann.get('id')} has unknown category {ann['category_id']}")
        by_image[ann["image_id"]].append(ann)

    out = Path(out_root)
    mask_dir = out / "mask" / _SPLIT_DIRS[split]
    mask_dir.mkdir(parents=True, exist_ok=True)
    existing = next((out / n for n in LABEL_FILE_NAMES if (out / n).is_file()), None)
    labels = dict(read_label_file(existing)) if existing is not None else {}
    ids, stats = [], {"images": 0, "written": 0, "no_annotations": 0, "crowd": 0}
    for img in sorted(data.get("images", []), key=lambda im: im["id"]):
        stats["images"] += 1
        anns = by_image.get(img["id"], [])
        if not anns:
            stats["no_annotations"] += 1
            continue
        stem = Path(img["file_name"]).stem
        vec = np.zeros(len(COCO_CLASSES), dtype=np.float32)
        for ann in anns:
            vec[cat_to_class[ann["category_id"]] - 1] = 1.0
            stats["crowd"] += int(bool(ann.get("iscrowd", 0)))
        mask = rasterize_annotations(anns, int(img["height"]), int(img["width"]), cat_to_class)
        colorize(mask).save(mask_dir / f"{stem}.png")
        labels[stem] = vec
        ids.append(stem)
        stats["written"] += 1
    (out / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    write_labels_json(out / "cls_labels.json", labels)
    log.info("COCO %s: %s -> %s (%s)", split, src, out, stats)
    return stats
