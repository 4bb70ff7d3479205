"""Datasets (VOC, COCO, synthetic, attributes), paired transforms, class names and loaders.

Entry points, in the order a run uses them::

    ds = build_dataset(cfg.data, "train", train=True)      # items: see cpal_ray/data/base.py
    loader = build_loader(ds, batch_size=16, shuffle=True, seed=cfg.train.seed)
    for epoch in range(epochs):
        set_epoch(loader, epoch)                             # fresh, reproducible augmentations
        for batch in loader: ...                             # {"id": [B], "image": (B, 3, S, S), ...}

No Ray here: ``cpal_ray.distributed`` wraps these.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from cpal_ray.data.assets import VOC12_META_DIR, VOC_MINI_DIR, resolve_root_path
from cpal_ray.data.attributes import AttributeShapes
from cpal_ray.data.base import FileDataset, SampleDataset, SkipUnreadable
from cpal_ray.data.classes import (COCO_CLASSES, VOC_CLASSES, attribute_class_names, colorize, synthetic_class_names,
                                   voc_palette)
from cpal_ray.data.coco import COCOSegmentation, convert_instances
from cpal_ray.data.files import DataError, set_max_image_pixels
from cpal_ray.data.folders import ImageFolderDataset, LabelFolderDataset
from cpal_ray.data.labels import cls_labels_value, convert_labels
from cpal_ray.data.synthetic import SyntheticShapes
from cpal_ray.data.transforms import EvalTransform, TrainTransform
from cpal_ray.data.voc import VOCSegmentation

__all__ = [
    "DataError", "SampleDataset", "FileDataset", "SkipUnreadable", "convert_labels", "labels_source",
    "record_labels_source", "VOCSegmentation", "COCOSegmentation", "SyntheticShapes", "AttributeShapes",
    "TrainTransform", "EvalTransform", "VOC_CLASSES", "COCO_CLASSES", "voc_palette", "colorize",
    "synthetic_class_names", "attribute_class_names", "convert_instances", "resolve_root", "class_names", "build_dataset",
    "collate", "build_loader", "set_epoch", "VOC_MINI_DIR", "VOC12_META_DIR", "LabelFolderDataset",
    "build_train_dataset", "stage_label_dir", "ImageFolderDataset",
]

_READERS = {"voc": VOCSegmentation, "coco": COCOSegmentation, "synthetic": SyntheticShapes,
            "attributes": AttributeShapes}
# Procedural readers: sized by the config, no files, split "train" or "val" only.
_PROCEDURAL = ("synthetic", "attributes")


def resolve_root(data_cfg) -> Path:
    """The dataset folder of a ``DataConfig``: ``"bundled:voc-mini"`` -> the packaged copy
    (found from the package's location, not the working directory), else ``data_cfg.root``."""
    return resolve_root_path(data_cfg.root)


def class_names(data_cfg) -> tuple[str, ...]:
    """The N foreground class names of the configured dataset (index n = mask value n + 1)."""
    if data_cfg.dataset == "voc":
        return VOC_CLASSES
    if data_cfg.dataset == "coco":
        return COCO_CLASSES
    if data_cfg.dataset == "attributes":
        return attribute_class_names(data_cfg.synthetic_classes)
    return synthetic_class_names(data_cfg.synthetic_classes)


def build_dataset(data_cfg, split: str = "train", train: bool | None = None, return_rgb: bool = False) -> SampleDataset:
    """The dataset of ``data_cfg.dataset`` for one split.

    split: "train" -> data_cfg.train_split, "val" -> data_cfg.val_split; any other name
        (e.g. "train_aug") or a path to a .txt is used as the id list directly (not for the
        procedural "synthetic" and "attributes" sets).
    train: training transform (random resize / flip / crop to crop_size) when True, original
        size when False; None = (split == "train").
    return_rgb: add the uint8 photo ``"rgb"`` (H, W, 3) to items (CRF, visuals).
    """
    if train is None:
        train = split == "train"
    set_max_image_pixels(data_cfg.max_image_pixels)
    if data_cfg.dataset in _PROCEDURAL:
        return _READERS[data_cfg.dataset].from_config(data_cfg, split, train, return_rgb)
    if data_cfg.root.startswith("bundled:") and data_cfg.dataset != "voc":
        raise DataError(f"data.root={data_cfg.root!r} is a VOC-layout dataset; set data.dataset=voc")
    name = {"train": data_cfg.train_split, "val": data_cfg.val_split}.get(split, split)
    dataset = _READERS[data_cfg.dataset].from_config(data_cfg, name, train, return_rgb)
    dataset.max_side = data_cfg.max_side
    return dataset


def stage_label_dir(cfg) -> str:
    """The label folder a refine stage trains on: ``affinity.seeds_dir`` or ``seg.masks_dir``."""
    field, value = {"affinity": ("affinity.seeds_dir", cfg.affinity.seeds_dir),
                    "seg": ("seg.masks_dir", cfg.seg.masks_dir)}[cfg.train.task]
    if not value:
        raise DataError(f"{field}: not set; name the folder of label PNGs this stage trains on")
    return value


def build_train_dataset(cfg) -> SampleDataset:
    """The training items of a run's ``train.task``: the dataset's own items for the CAM network
    (image-level labels), or its images with the label PNGs of ``stage_label_dir(cfg)`` as masks
    (``LabelFolderDataset``) for the affinity and segmentation networks; training transform."""
    if cfg.train.task == "cam":
        return build_dataset(cfg.data, "train", train=True)
    base = build_dataset(cfg.data, "train", train=False)
    transform = TrainTransform(cfg.training.resize_long, cfg.training.crop_size, cfg.data.hflip)
    return LabelFolderDataset(base, stage_label_dir(cfg), transform, seed=cfg.data.seed,
                              on_bad_sample=cfg.data.on_bad_sample)


def labels_source(dataset) -> str:
    """Where the image-level labels of ``dataset`` come from, as runs record them (saved configs,
    manifests): the ``cls_labels_value`` of its label file (``bundled:`` name or absolute path);
    "procedural" for the synthetic and attribute sets."""
    dataset = dataset.base if isinstance(dataset, LabelFolderDataset) else dataset
    return cls_labels_value(dataset.labels_file) if isinstance(dataset, FileDataset) else "procedural"


def record_labels_source(data_cfg, dataset):
    """``data_cfg`` with ``cls_labels`` naming the label file ``dataset`` read (file datasets; others
    are returned unchanged): the config a run saves then says, and reloads, the labels it used."""
    dataset = dataset.base if isinstance(dataset, LabelFolderDataset) else dataset
    if not isinstance(dataset, FileDataset):
        return data_cfg
    return dataclasses.replace(data_cfg, cls_labels=cls_labels_value(dataset.labels_file))


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items: "image" (B, 3, H, W), "label" (B, N), "mask" (B, H, W) tensors; "id" a list
    of B str; "rgb" (when present) a list of B uint8 arrays (H, W, 3), left as numpy.

    Items of different sizes (eval items keep their size) can only be batched one at a time.
    """
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch images of different sizes {sorted(shapes)}; eval items keep "
                         "their original size, use batch_size=1")
    out = {"id": [item["id"] for item in batch],
           "image": torch.stack([item["image"] for item in batch]),
           "label": torch.stack([item["label"] for item in batch]),
           "mask": torch.stack([item["mask"] for item in batch])}
    if "rgb" in batch[0]:
        out["rgb"] = [item["rgb"] for item in batch]
    return out


def build_loader(dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                 sampler: Sampler | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader with ``collate`` and a seeded shuffling order.

    The order is drawn from ``torch.Generator().manual_seed(seed)``; a given ``sampler`` (e.g.
    a DistributedSampler) replaces shuffling, so ``shuffle`` is then ignored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate, drop_last=drop_last,
                      generator=generator, persistent_workers=False)


def set_epoch(loader_or_dataset, epoch: int) -> None:
    """Tell a dataset (or a loader's dataset and sampler) which epoch comes next: selects the
    augmentation stream and, for a DistributedSampler, the shuffling order."""
    for obj in (getattr(loader_or_dataset, "dataset", None), getattr(loader_or_dataset, "sampler", None),
                loader_or_dataset):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
