"""Procedural segmentation data: textured, class-coloured shapes on grey clutter.

Every class has its own hue (golden-ratio spacing) and texture (stripes, checks, dots or rings
with a class-specific period and angle); each shape jitters them slightly. The background is
grey (unsaturated) clutter, so colour alone separates classes from it and from each other: a
tiny CNN learns the set in a few epochs. Masks are exact (0 bg, 1..N classes, no 255) and the
label is read off the final mask, so label and mask always agree.

Image i of a split is a pure function of (seed, split, i): nothing is stored, and the train and
val splits use different random streams. The drawing helpers (``clutter``, ``shape_region``,
``texture``, ``two_tone``, ``class_style``) are shared with ``attributes.py``.
"""
from __future__ import annotations

import colorsys

import numpy as np

from cpal_ray.data.base import SampleDataset
from cpal_ray.data.classes import SYNTHETIC_PATTERNS, synthetic_class_names
from cpal_ray.data.transforms import EvalTransform, TrainTransform, resize_bilinear

SPLIT_CODES = {"train": 0, "val": 1}
_SHAPES = ("ellipse", "rectangle", "triangle")
# A class must keep at least this fraction of the image visible after occlusion.
MIN_VISIBLE = 0.03
MAX_TRIES = 20


def class_style(c: int) -> dict:
    """Appearance of class c (0-based): hue in [0, 1), pattern name, period (px), angle (rad)."""
    return {"hue": (c * 0.6180339887) % 1.0,
            "pattern": SYNTHETIC_PATTERNS[c % len(SYNTHETIC_PATTERNS)],
            "period": 6.0 + 3.0 * ((c // len(SYNTHETIC_PATTERNS)) % 4),
            "angle": np.deg2rad((c * 47) % 180)}


def hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] (hue wraps) -> float32 RGB (3,) in [0, 255]."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def two_tone(hue: float, bright: float) -> tuple[np.ndarray, np.ndarray]:
    """The "on" and "off" RGB colours of a texture of this hue and brightness."""
    return hsv(hue, 0.85, bright), hsv(hue, 0.9, bright * 0.55)


def clutter(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey background (S, S, 3) float32: smooth noise, grey blocks, pixel noise; no hue."""
    coarse = rng.uniform(50, 200, size=(6, 6, 1)).astype(np.uint8).repeat(3, axis=2)
    grey = resize_bilinear(coarse, (size, size))[..., 0].astype(np.float32)
    for _ in range(rng.integers(2, 6)):
        y, x = rng.integers(0, size, 2)
        h, w = rng.integers(size // 10, size // 3, 2)
        grey[y:y + h, x:x + w] = rng.uniform(40, 210)
    grey += rng.normal(0, 6, size=grey.shape).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=2) + rng.normal(0, 2, size=(size, size, 3)).astype(np.float32)


def shape_region(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int,
                 radius: tuple[float, float] = (0.18, 0.30)):
    """Bool (S, S) region of one random shape (ellipse, rectangle or triangle), and its centre
    (cy, cx). The radius is drawn in ``radius`` (fractions of the side S)."""
    r = rng.uniform(*radius) * size
    cy, cx = rng.uniform(r * 0.7, size - r * 0.7, 2)
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    kind = _SHAPES[rng.integers(len(_SHAPES))]
    aspect = rng.uniform(0.6, 1.0)
    if kind == "ellipse":
        region = (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1.0
    elif kind == "rectangle":
        region = (np.abs(u) <= r * 0.9) & (np.abs(v) <= r * 0.9 * aspect)
    else:  # triangle: three half-planes at 120 degrees
        region = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = theta + 2 * np.pi * k / 3
            region &= (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a) <= r * 0.6
    return region, (cy, cx)


def texture(style: dict, rng: np.random.Generator, yy, xx, centre) -> np.ndarray:
    """Bool (S, S) "on" pixels of a class texture with jittered period, angle and phase."""
    period = style["period"] * rng.uniform(0.85, 1.15)
    angle = style["angle"] + rng.uniform(-0.25, 0.25)
    phase = rng.uniform(0, period)
    u = xx * np.cos(angle) + yy * np.sin(angle) + phase
    v = -xx * np.sin(angle) + yy * np.cos(angle) + phase
    pattern = style["pattern"]
    if pattern == "stripes":
        return (u % period) < period / 2
    if pattern == "checks":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if pattern == "dots":
        du, dv = u % period - period / 2, v % period - period / 2
        return du * du + dv * dv < (0.3 * period) ** 2
    dist = np.hypot(yy - centre[0], xx - centre[1])  # rings
    return (dist + phase) % period < period / 2


def draw_scene(paint, classes, num_classes: int, size: int, rng: np.random.Generator):
    """Paint a scene until every class of ``classes`` covers MIN_VISIBLE of it (at most MAX_TRIES
    tries), then add the sensor noise: (rgb uint8 (S, S, 3), mask uint8 (S, S) in 0..N, label
    float32 (N,) of the classes in the mask, what the last ``paint`` returned).

    ``paint(rgb, mask)`` draws the objects of one try over fresh clutter (float32 rgb, zero mask),
    in place; the random draws follow the same order at every call, so a scene is reproducible.
    """
    for _ in range(MAX_TRIES):
        rgb = clutter(rng, size)
        mask = np.zeros((size, size), dtype=np.uint8)
        painted = paint(rgb, mask)
        visible = np.bincount(mask.ravel(), minlength=num_classes + 1)[1:]
        if (visible[classes] >= MIN_VISIBLE * size * size).all():
            break
    label = (np.bincount(mask.ravel(), minlength=num_classes + 1)[1:] > 0).astype(np.float32)
    rgb += rng.normal(0, 4, size=rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8), mask, label, painted


def render(num_classes: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: rgb uint8 (S, S, 3), mask uint8 (S, S) in 0..N, label float32 (N,) with 1 to
    min(3, N) positives, equal to the classes present in the mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    k = int(rng.integers(1, min(3, num_classes), endpoint=True))
    classes = rng.choice(num_classes, size=k, replace=False)

    def paint(rgb, mask):
        for c in classes:
            style = class_style(int(c))
            hue = style["hue"] + rng.uniform(-0.02, 0.02)
            bright = rng.uniform(0.85, 1.0)
            on, off = two_tone(hue, bright)
            for _ in range(rng.integers(1, 2, endpoint=True)):  # 1 or 2 shapes
                region, centre = shape_region(rng, yy, xx, size)
                tex = texture(style, rng, yy, xx, centre)
                rgb[region] = np.where(tex[region][:, None], on, off)
                mask[region] = c + 1

    return draw_scene(paint, classes, num_classes, size, rng)[:3]


class SyntheticShapes(SampleDataset):
    """``num_images`` procedural images of side ``size`` over ``num_classes`` classes.

    Items follow the VOC item format exactly (see ``cpal_ray.data.base``); ids are
    ``synthetic_<split>_<i:05d>``. ``split`` is "train" or "val" (different images).
    """

    def __init__(self, num_classes: int = 4, num_images: int = 32, size: int = 96, *, split: str = "train",
                 seed: int = 0, transform=None, return_rgb: bool = False):
        super().__init__(transform, return_rgb, seed)
        if split not in SPLIT_CODES:
            raise ValueError(f"synthetic split must be 'train' or 'val', got {split!r}")
        if not 1 <= num_classes <= 254:
            raise ValueError(f"synthetic num_classes must be in 1..254, got {num_classes}")
        if num_images < 1 or size < 16:
            raise ValueError(f"synthetic needs num_images >= 1 and size >= 16, got {num_images}, {size}")
        self.num_classes, self.size, self.split = int(num_classes), int(size), split
        self.class_names = synthetic_class_names(self.num_classes)
        self.ids = [f"synthetic_{split}_{i:05d}" for i in range(num_images)]

    @classmethod
    def from_config(cls, data_cfg, split: str, train: bool, return_rgb: bool = False) -> "SyntheticShapes":
        """Sized by data_cfg.synthetic_classes / synthetic_images / synthetic_size; seed = data_cfg.seed."""
        transform = TrainTransform.from_config(data_cfg) if train else EvalTransform()
        return cls(data_cfg.synthetic_classes, data_cfg.synthetic_images, data_cfg.synthetic_size,
                   split=split, seed=data_cfg.seed, transform=transform, return_rgb=return_rgb)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], index, 0x5EED])
        return render(self.num_classes, self.size, rng)
