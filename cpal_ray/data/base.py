"""What every reader shares: the item format, the bad-sample policy, the file-backed dataset.

Item format (docs/DESIGN.md), ``dataset[i]`` ->
    {"id": str, "image": float32 (3, H, W) ImageNet-normalised, "label": float32 (N,) multi-hot,
     "mask": int64 (H, W) 0 bg / 1..N classes / 255 ignore, "rgb": uint8 (H, W, 3) if return_rgb}

A sample without a mask file gets an all-255 mask (training needs none); ``check_mask`` raises
for it, and the evaluators call it, so such an image is reported, never scored as all-ignore.
Unreadable samples (``on_bad_sample``): "error" raises the DataError of ``cpal_ray.data.files``
(naming the file and id); "skip" drops bad ids when the dataset is built and, in training,
``SkipUnreadable`` replaces an image that fails to decode by the next readable one and reports it.

Augmentation randomness of item i is drawn from ``numpy.random.default_rng([seed, epoch, i])``,
so an item is the same whatever the worker or process that loads it; call ``set_epoch`` (or
``cpal_ray.data.set_epoch(loader, epoch)``) before each epoch to get fresh augmentations.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Hashable

import numpy as np
import torch
from torch.utils.data import Dataset

from cpal_ray.data.files import DataError, read_image_hw, read_mask, read_rgb
from cpal_ray.data.transforms import IGNORE_INDEX, EvalTransform, fit_long_side, resize_bilinear, resize_nearest

log = logging.getLogger(__name__)

# How many skipped ids are logged one by one before only the total is logged.
_LOG_SKIPS = 10


def check_label(vec: np.ndarray, num_classes: int, labels_file: Path | str, sample_id: str) -> str | None:
    """Reason why a label vector is unusable (wrong length, not 0/1, no positive), or None."""
    if vec.shape != (num_classes,):
        return f"{labels_file}: label of id {sample_id} has shape {vec.shape}, expected ({num_classes},)"
    if not np.isin(vec, (0.0, 1.0)).all():
        return f"{labels_file}: label of id {sample_id} is not multi-hot 0/1: {vec.tolist()}"
    if vec.sum() == 0:
        return f"{labels_file}: id {sample_id} has no positive class"
    return None


# -------------------------------------------------------------------------------------- datasets

class SampleDataset(Dataset):
    """Base of all readers: turns ``read(index) -> (rgb, mask, label)`` into items.

    Subclasses set ``ids`` (list[str]), ``num_classes`` and ``class_names`` and implement
    ``read``: rgb uint8 (H, W, 3), mask (H, W) ints (all 255 when unknown), label float32 (N,).
    """

    ids: list[str]
    num_classes: int
    class_names: tuple[str, ...]

    def __init__(self, transform=None, return_rgb: bool = False, seed: int = 0):
        self.transform = transform if transform is not None else EvalTransform()
        self.return_rgb = bool(return_rgb)
        self.seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def label_of(self, index: int) -> np.ndarray:
        """Multi-hot float32 (N,) of item ``index``."""
        return self.read(index)[2]

    def read_image(self, index: int) -> np.ndarray:
        """uint8 (H, W, 3) photo of item ``index``, not normalised: what CRF and figures draw on."""
        return self.read(index)[0]

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of item ``index`` as ``read`` returns it (readers of files read only the header)."""
        return tuple(self.read(index)[0].shape[:2])

    def check_mask(self, index: int) -> None:
        """Raise DataError when item ``index`` has no ground-truth mask to score against (procedural
        sets always have one)."""

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of this epoch (see the module docstring)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = index % len(self)
        rgb, mask, label = self.read(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, mask_t, rgb_out = self.transform(rgb, mask, rng)
        item = {"id": self.ids[index], "image": image, "label": torch.from_numpy(np.asarray(label, np.float32)),
                "mask": mask_t}
        if self.return_rgb:
            item["rgb"] = np.ascontiguousarray(rgb_out, dtype=np.uint8)
        return item

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} items, {self.num_classes} classes, "
                f"skipped={len(self.skipped)})")


class FileDataset(SampleDataset):
    """A reader of image files + a labels dict + optional mask PNGs.

    Subclasses implement ``image_path(id)`` and ``mask_path(id)`` (a Path whose absence means
    "no mask": all 255) and call ``_select_ids`` from their constructor. ``max_side`` (set by
    ``build_dataset`` from ``data.max_side``; 0 = off) downscales every image whose long side is
    longer, and its mask with it (bilinear / nearest), as it is read: every size a consumer sees
    (``read``, ``read_image``, ``image_size``) is the downscaled one.
    """

    max_side: int = 0

    def __init__(self, num_classes: int, class_names, transform=None, return_rgb: bool = False,
                 seed: int = 0, on_bad_sample: str = "error"):
        super().__init__(transform, return_rgb, seed)
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.num_classes = int(num_classes)
        self.class_names = tuple(class_names)
        self.on_bad_sample = on_bad_sample
        self.ids, self.labels, self.labels_file = [], {}, None

    def image_path(self, sample_id: str) -> Path:
        raise NotImplementedError

    def mask_path(self, sample_id: str) -> Path:
        raise NotImplementedError

    def check_mask(self, index: int) -> None:
        sid = self.ids[index]
        path = self.mask_path(sid)
        if not path.is_file():
            raise DataError(f"{path}: ground-truth mask missing (id {sid}); the image cannot be scored")

    def _bad(self, sample_id: str, reason: str) -> None:
        if self.on_bad_sample == "error":
            raise DataError(reason)
        self.skipped.append((sample_id, reason))
        if len(self.skipped) <= _LOG_SKIPS:
            log.warning("skipping sample %s: %s", sample_id, reason)

    def _select_ids(self, ids: list[str], labels: dict, key_fn: Callable[[str], Hashable],
                    labels_file: Path, source: str) -> None:
        """Keep the ids whose image exists and whose label is a valid multi-hot with a positive;
        others raise DataError (on_bad_sample="error") or go to ``self.skipped``."""
        self.labels_file = labels_file
        before = len(self.skipped)
        for sid in ids:
            path = self.image_path(sid)
            if not path.is_file():
                self._bad(sid, f"{path}: image file missing (id {sid}, listed in {source})")
                continue
            vec = labels.get(key_fn(sid))
            if vec is None:
                self._bad(sid, f"{labels_file}: id {sid} has no image-level label (image {path})")
                continue
            reason = check_label(vec, self.num_classes, labels_file, sid)
            if reason:
                self._bad(sid, f"{reason} (image {path})")
                continue
            self.ids.append(sid)
            self.labels[sid] = vec
        n_skipped = len(self.skipped) - before
        if n_skipped:
            log.warning("%s: skipped %d of %d ids from %s (see .skipped)", type(self).__name__,
                        n_skipped, len(ids), source)
        if not self.ids:
            raise DataError(f"{source}: no usable samples ({len(ids)} listed, {n_skipped} skipped)")

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sid = self.ids[index]
        path = self.image_path(sid)
        rgb = read_rgb(path, sid)
        mpath = self.mask_path(sid)
        if mpath.is_file():
            mask = read_mask(mpath, sid, self.num_classes, rgb.shape[:2], path)
        else:
            mask = np.full(rgb.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        size = fit_long_side(rgb.shape[:2], self.max_side)
        if size != rgb.shape[:2]:
            rgb, mask = resize_bilinear(rgb, size), resize_nearest(mask, size)
        return rgb, mask, self.labels[sid]

    def read_image(self, index: int) -> np.ndarray:
        """uint8 (H, W, 3) photo of item ``index`` (downscaled to ``max_side``), without its mask."""
        sid = self.ids[index]
        rgb = read_rgb(self.image_path(sid), sid)
        size = fit_long_side(rgb.shape[:2], self.max_side)
        return resize_bilinear(rgb, size) if size != rgb.shape[:2] else rgb

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of item ``index`` as ``read`` returns it, from the file header (not decoded)."""
        sid = self.ids[index]
        return fit_long_side(read_image_hw(self.image_path(sid), sid), self.max_side)

    def label_of(self, index: int) -> np.ndarray:
        return self.labels[self.ids[index]]

    def validate(self) -> list[tuple[str, str]]:
        """Decode every image and mask now (slow: reads all files).

        Returns the (id, reason) problems. With on_bad_sample="error" any problem raises one
        DataError listing them; with "skip" the bad ids are dropped and added to ``skipped``.
        """
        problems = []
        for i, sid in enumerate(self.ids):
            try:
                self.read(i)
            except DataError as e:
                problems.append((sid, str(e)))
        if problems and self.on_bad_sample == "error":
            listed = "\n  ".join(r for _, r in problems[:5])
            raise DataError(f"{len(problems)} bad samples of {len(self.ids)}:\n  {listed}")
        if problems:
            bad = {sid for sid, _ in problems}
            for sid, reason in problems:
                self._bad(sid, reason)
            self.ids = [s for s in self.ids if s not in bad]
            log.warning("%s.validate: dropped %d bad samples", type(self).__name__, len(problems))
            if not self.ids:
                raise DataError(f"validate: all {len(problems)} samples are bad; first: {problems[0][1]}")
        return problems


class SkipUnreadable(Dataset):
    """Training items with ``data.on_bad_sample="skip"``: an image or mask that fails to decode
    (DataError) is replaced by the next readable item (index + 1, + 2, … wrapping), so every
    step keeps its batch size and the ranks of a data-parallel run keep stepping together.

    Every item gets ``"skipped"``: the ids replaced on the way to it, space-separated ("" when
    none); ``train_one_epoch`` counts them into the epoch's record and logs them.
    """

    def __init__(self, dataset: SampleDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n, skipped = len(self.dataset), []
        for k in range(n):
            j = (index + k) % n
            try:
                item = self.dataset[j]
            except DataError as e:
                skipped.append(self.dataset.ids[j])
                log.warning("skipping unreadable sample %s: %s", self.dataset.ids[j], e)
                continue
            item["skipped"] = " ".join(skipped)
            return item
        raise DataError(f"none of the {n} samples can be read; first: {skipped[:1]}")
