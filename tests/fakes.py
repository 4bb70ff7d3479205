"""Fake data for tests: tensors shaped like real batches and tiny dataset trees on disk.

Tensors: ``fake_images`` (B, 3, H, W), ``fake_labels`` (B, N) multi-hot with >= 1 positive,
``fake_masks`` (B, H, W) consistent with the labels and with a 255 band, ``fake_batch`` all of
them in the layout of ``cpal_ray.data.collate``.

Trees: ``make_voc_tree`` writes a PASCAL-VOC-style folder (JPEGs, palette masks, id list,
cls_labels.npy with str or int keys) and returns what it wrote, so tests can compare.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cpal_ray.data.classes import colorize

# ------------------------------------------------------------------------------------ tensors


def fake_labels(batch: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Multi-hot float32 (B, N); every row has at least one positive."""
    g = np.random.default_rng(seed)
    labels = (g.random((batch, num_classes)) < 0.3).astype(np.float32)
    labels[np.arange(batch), g.integers(0, num_classes, batch)] = 1.0
    return torch.from_numpy(labels)


def fake_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Float32 (B, 3, H, W), roughly ImageNet-normalised (zero mean, unit variance)."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32))


def fake_masks(labels: torch.Tensor, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Int64 (B, H, W): background 0, one rectangle per positive class (value n + 1), a
    one-pixel 255 border around each rectangle. Classes in a mask = positives of its label."""
    g = np.random.default_rng(seed)
    out = np.zeros((labels.shape[0], height, width), dtype=np.int64)
    for b, row in enumerate(labels.numpy()):
        for n in np.flatnonzero(row):
            y0, x0 = g.integers(0, max(1, height - 4)), g.integers(0, max(1, width - 4))
            y1, x1 = min(height, y0 + g.integers(4, max(5, height // 2))), min(width, x0 + g.integers(4, max(5, width // 2)))
            out[b, max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = 255
            out[b, y0:y1, x0:x1] = n + 1
    return torch.from_numpy(out)


def fake_batch(batch: int = 2, num_classes: int = 3, size: int = 32, seed: int = 0) -> dict:
    """A batch like ``collate`` returns: id list, image (B, 3, S, S), label (B, N), mask (B, S, S)."""
    labels = fake_labels(batch, num_classes, seed)
    return {"id": [f"fake_{i:03d}" for i in range(batch)], "image": fake_images(batch, size, size, seed),
            "label": labels, "mask": fake_masks(labels, size, size, seed)}


# ---------------------------------------------------------------------------------- files


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 95) -> Path:
    """Save uint8 (H, W, 3) as JPEG (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path, quality=quality)
    return path


def write_mask(path: Path, mask: np.ndarray) -> Path:
    """Save (H, W) values 0..255 as a VOC palette PNG (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colorize(mask).save(path)
    return path


def save_labels(path: Path, labels: dict, key_style: str = "str") -> Path:
    """np.save a dict id -> float32 multi-hot; key_style "int" writes VOC ids as ints
    (``2007_000032`` -> 2007000032), as the public WSSS label files do."""
    if key_style == "int":
        labels = {int(k.replace("_", "")): v for k, v in labels.items()}
    elif key_style != "str":
        raise ValueError(f"key_style must be 'str' or 'int', got {key_style!r}")
    np.save(path, labels, allow_pickle=True)
    return Path(path)


@dataclass
class FakeVOC:
    """What ``make_voc_tree`` wrote: root, ids in list order, labels {id: (N,)}, masks
    {id: (H, W) uint8}, rgbs {id: (H, W, 3) uint8 before JPEG compression}."""
    root: Path
    ids: list[str]
    labels: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    rgbs: dict = field(default_factory=dict)

    def image(self, sid: str) -> Path:
        return self.root / "JPEGImages" / f"{sid}.jpg"

    def mask(self, sid: str) -> Path:
        return self.root / "SegmentationClass" / f"{sid}.png"


def make_voc_tree(root: Path, ids=("2007_000032", "2007_000039", "2008_000123"), num_classes: int = 20,
                  key_style: str = "str", size: tuple[int, int] = (24, 32), with_masks: bool = True,
                  split: str = "train", list_in: str = "imagesets", seed: int = 0) -> FakeVOC:
    """Write a tiny VOC2012-style tree under ``root``.

    Image k has classes {k % N, (k + 3) % N if k is odd}: a flat-coloured rectangle per class on a
    grey background, its mask holding n + 1 inside the rectangle and a 255 border. The id list
    goes to ImageSets/Segmentation/<split>.txt (list_in="imagesets") or <root>/<split>.txt
    ("root"); labels to <root>/cls_labels.npy with ``key_style`` keys.
    """
    root = Path(root)
    g = np.random.default_rng(seed)
    H, W = size
    fake = FakeVOC(root, list(ids))
    for k, sid in enumerate(ids):
        classes = [k % num_classes] + ([(k + 3) % num_classes] if k % 2 and num_classes > 1 else [])
        rgb = np.full((H, W, 3), 128, dtype=np.uint8)
        mask = np.zeros((H, W), dtype=np.uint8)
        for j, n in enumerate(classes):
            y0, x0 = 2 + j * (H // 2 - 2), 2 + j * (W // 2 - 2)
            y1, x1 = y0 + H // 2 - 4, x0 + W // 2 - 4
            mask[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = 255
            mask[y0:y1, x0:x1] = n + 1
            rgb[y0:y1, x0:x1] = g.integers(0, 256, 3)
        label = np.zeros(num_classes, dtype=np.float32)
        label[classes] = 1.0
        write_jpeg(root / "JPEGImages" / f"{sid}.jpg", rgb)
        if with_masks:
            write_mask(root / "SegmentationClass" / f"{sid}.png", mask)
        fake.labels[sid], fake.masks[sid], fake.rgbs[sid] = label, mask, rgb
    list_dir = root / "ImageSets" / "Segmentation" if list_in == "imagesets" else root
    list_dir.mkdir(parents=True, exist_ok=True)
    (list_dir / f"{split}.txt").write_text("".join(f"{sid}\n" for sid in ids))
    save_labels(root / "cls_labels.npy", fake.labels, key_style)
    return fake
