"""Class names and the VOC colour palette.

Name lists hold the N foreground classes only; index n in a name list is label position n and
mask value n + 1 (mask value 0 is background, 255 is ignore).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# PASCAL VOC 2012, mask values 1..20.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# COCO 2014 things, mask values 1..80, in increasing COCO category-id order (ids 1..90 sparse).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# Texture of each synthetic class cycles through these (see cpal_ray/data/synthetic.py).
SYNTHETIC_PATTERNS = ("stripes", "checks", "dots", "rings")


def positive_classes(label) -> np.ndarray:
    """Multi-hot image label (N,) (numpy, list or a tensor on any device) -> (K,) int64 indices
    in 0..N-1 of its positive classes."""
    if hasattr(label, "detach"):
        label = label.detach().cpu().numpy()
    return np.flatnonzero(np.asarray(label).reshape(-1) > 0).astype(np.int64)


def synthetic_class_names(num_classes: int) -> tuple[str, ...]:
    """Names of the procedural classes: ``("shape00_stripes", "shape01_checks", ...)``."""
    return tuple(f"shape{i:02d}_{SYNTHETIC_PATTERNS[i % len(SYNTHETIC_PATTERNS)]}"
                 for i in range(num_classes))


def attribute_class_names(num_classes: int) -> tuple[str, ...]:
    """Names of the attribute-benchmark classes (cpal_ray/data/attributes.py): ``("object00", ...)``."""
    return tuple(f"object{i:02d}" for i in range(num_classes))


def voc_palette() -> np.ndarray:
    """The standard VOC colour map, uint8 (256, 3).

    Entry i spreads the bits of i over the three channels: bit 3k of i goes to red, bit 3k+1
    to green, bit 3k+2 to blue, each at bit position 7-k of its channel (so 1 = dark red,
    255 = (224, 224, 192)).
    """
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        code, rgb = i, [0, 0, 0]
        for k in range(8):
            for ch in range(3):
                rgb[ch] |= ((code >> ch) & 1) << (7 - k)
            code >>= 3
        pal[i] = rgb
    return pal


def colorize(mask: np.ndarray) -> Image.Image:
    """Mask (H, W) of values 0..255 -> palette ('P') PIL image with the VOC colours."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"colorize expects a (H, W) mask, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("colorize: mask values must lie in 0..255")
    img = Image.fromarray(arr.astype(np.uint8))  # mode 'L'; putpalette turns it into 'P'
    img.putpalette(voc_palette().reshape(-1).tolist())
    return img
