"""Attribute benchmark: objects made of parts, each part one of its class's appearances.

The structure CPAL argues from (Sec. 1, Fig. 1): instances of a class show different
attributes, a BCE-trained CAM fires on the most discriminative one, and prototypes gathered
from other instances carry the rest. Here every piece of that is known exactly.

Appearances. An appearance is a colour/texture pair: appearance id k looks like
``synthetic.class_style(k)`` (hue, pattern, period, angle), painted two-tone as in
``synthetic.py``. Class c (0-based) of N owns A = ``attributes_per_class`` appearances (slots):

- slot 0, its **signature**: unique to c, shown by SIGNATURE_PROB (85 %) of its instances, on a
  small part (SIGNATURE_FRACTION, 20-35 % of the object): the discriminative cue.
- slot A-1, **shared** with another class: classes 2j and 2j+1 share one appearance (with an odd
  N the last class shares its pair's with classes N-3 and N-2; with N = 1 the slot is unique).
  Shown by SHARED_PROB (70 %) of the instances; it tells c from its partner only by context,
  so a BCE classifier has little reason to fire on it although it is part of the object.
- slots 1 .. A-2: unique to c and **rare**: they fill the object up to its 2 or 3 parts, so
  each shows in roughly a quarter to a half of the instances (A = 4: about a third).

Ids: signatures 0..N-1 (the best-spread hues), then the unique rare slots, then the shared
appearances, then BACKGROUND_APPEARANCES ids used only by background distractors.

An image: 1 to min(3, N) classes (the second is the first's sharing partner with probability
PARTNER_PROB, so the classes that share an appearance co-occur), one object per class. An object
is a ``synthetic.shape_region`` cut into 2 or 3 parallel bands (parts) along a random direction,
one appearance per band. Behind the objects: the grey clutter of ``synthetic.py`` and 1 to 3
small distractor patches in background appearances (saturated like the objects, so colour alone
does not separate object from background). Masks are exact: 0 background (clutter and
distractors), c + 1 for class c, never 255; the label is read off the final mask, and every
labelled class keeps at least 3 % of the image visible. ``AttributeShapes.parts(i)`` gives the
appearance id of every pixel (-1 = clutter), so coverage can be measured per attribute.

Image i of a split is a pure function of (seed, split, i, N, A, size); nothing is stored.
"""
from __future__ import annotations

import numpy as np

from cpal_ray.data.base import SampleDataset
from cpal_ray.data.classes import attribute_class_names
from cpal_ray.data.synthetic import SPLIT_CODES, class_style, draw_scene, shape_region, texture, two_tone
from cpal_ray.data.transforms import EvalTransform, TrainTransform

# Fraction of a class's instances that show its signature appearance (slot 0), and its shared one (slot A-1).
SIGNATURE_PROB = 0.85
SHARED_PROB = 0.7
# Share of the object's pixels the signature part takes when shown: uniform in this range.
SIGNATURE_FRACTION = (0.20, 0.35)
# Parts (appearances shown) per object: uniform in this range, at most A.
PARTS_PER_OBJECT = (2, 3)
# With two or more classes, the second is the first one's sharing partner this often.
PARTNER_PROB = 0.5
# Appearances that only background distractors use, and distractors per image.
BACKGROUND_APPEARANCES = 4
DISTRACTORS = (1, 3)
# Radii (fractions of the side) of objects and of distractor patches.
OBJECT_RADIUS = (0.20, 0.32)
DISTRACTOR_RADIUS = (0.06, 0.12)


def partner(c: int, num_classes: int) -> int:
    """The class that shares class c's slot A-1 appearance (c itself when N = 1)."""
    if num_classes == 1:
        return c
    mate = c ^ 1
    return mate if mate < num_classes else c - 1


def _shared_id(c: int, num_classes: int, attributes_per_class: int) -> int:
    base = num_classes + num_classes * (attributes_per_class - 2)
    if num_classes == 1:
        return base
    return base + min(c // 2, num_classes // 2 - 1)


def class_attributes(c: int, num_classes: int, attributes_per_class: int) -> list[int]:
    """Appearance ids of class c's A slots: [signature, unique rare ..., shared]."""
    rare = num_classes + c * (attributes_per_class - 2)
    return [c, *range(rare, rare + attributes_per_class - 2), _shared_id(c, num_classes, attributes_per_class)]


def background_appearances(num_classes: int, attributes_per_class: int) -> list[int]:
    """Appearance ids used only by background distractors (BACKGROUND_APPEARANCES of them)."""
    first = _shared_id(num_classes - 1, num_classes, attributes_per_class) + 1
    return list(range(first, first + BACKGROUND_APPEARANCES))


def object_slots(rng: np.random.Generator, attributes_per_class: int) -> tuple[list[int], np.ndarray]:
    """The slots one instance shows and the fraction of its pixels each takes.

    The signature (slot 0) with probability SIGNATURE_PROB, the shared slot (A-1) with
    SHARED_PROB, then rare slots (1..A-2, random order) until the object has its 2 or 3 parts
    (the shared slot, then the signature, fill in when no rare one is left).
    Returns (slots, fractions (len(slots),) summing to 1); the signature, when shown, comes first
    and takes SIGNATURE_FRACTION of the object, the other slots share the rest.
    """
    a = attributes_per_class
    k = min(int(rng.integers(PARTS_PER_OBJECT[0], PARTS_PER_OBJECT[1], endpoint=True)), a)
    sig, shared = rng.random() < SIGNATURE_PROB, rng.random() < SHARED_PROB
    slots = [0] if sig else []
    others = ([a - 1] if shared else []) + rng.permutation(np.arange(1, a - 1)).tolist()
    others += ([a - 1] if not shared else []) + ([0] if not sig else [])  # fillers
    slots = slots + others[:k - len(slots)]
    weights = rng.uniform(0.7, 1.3, size=len(slots))
    if slots[0] != 0:
        return slots, weights / weights.sum()
    share = rng.uniform(*SIGNATURE_FRACTION)
    rest = weights[1:]
    return slots, np.concatenate([[share], (1 - share) * rest / rest.sum()])


def _bands(region: np.ndarray, fractions: np.ndarray, angle: float, yy, xx) -> np.ndarray:
    """Cut a region into parallel bands holding ``fractions`` of its pixels.

    Returns int (S, S): the band index (0..len(fractions)-1) inside the region, -1 outside.
    """
    proj = xx * np.cos(angle) + yy * np.sin(angle)
    cuts = np.quantile(proj[region], np.cumsum(fractions)[:-1]) if region.any() else []
    band = np.full(region.shape, -1, dtype=np.int64)
    band[region] = np.searchsorted(cuts, proj[region], side="right")
    return band


def _paint(rgb: np.ndarray, parts: np.ndarray, where: np.ndarray, appearance: int,
           rng: np.random.Generator, yy, xx, centre) -> None:
    """Paint appearance ``appearance`` (jittered hue and brightness) on the pixels ``where``."""
    style = class_style(appearance)
    on, off = two_tone(style["hue"] + rng.uniform(-0.02, 0.02), rng.uniform(0.85, 1.0))
    tex = texture(style, rng, yy[where], xx[where], centre)  # only the painted pixels
    rgb[where] = np.where(tex[:, None], on, off)
    parts[where] = appearance


def render_attributes(num_classes: int, attributes_per_class: int, size: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image: rgb uint8 (S, S, 3), mask uint8 (S, S) in 0..N, label float32 (N,) equal to
    the classes in the mask, parts int16 (S, S) appearance id per pixel (-1 = clutter)."""
    n, a = num_classes, attributes_per_class
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    k = int(rng.integers(1, min(3, n), endpoint=True))
    classes = rng.choice(n, size=k, replace=False).tolist()
    mate = partner(classes[0], n)
    if k >= 2 and mate not in classes and rng.random() < PARTNER_PROB:
        classes[1] = mate
    background = background_appearances(n, a)

    def paint(rgb, mask):
        parts = np.full((size, size), -1, dtype=np.int16)
        for _ in range(int(rng.integers(DISTRACTORS[0], DISTRACTORS[1], endpoint=True))):
            region, centre = shape_region(rng, yy, xx, size, radius=DISTRACTOR_RADIUS)
            _paint(rgb, parts, region, background[int(rng.integers(len(background)))], rng, yy, xx, centre)
        for c in classes:
            region, centre = shape_region(rng, yy, xx, size, radius=OBJECT_RADIUS)
            slots, fractions = object_slots(rng, a)
            order = rng.permutation(len(slots))  # where along the object each part lies
            band = _bands(region, fractions[order], rng.uniform(0, np.pi), yy, xx)
            ids = class_attributes(int(c), n, a)
            for pos, j in enumerate(order):
                _paint(rgb, parts, band == pos, ids[slots[j]], rng, yy, xx, centre)
            mask[region] = c + 1
        return parts

    return draw_scene(paint, classes, n, size, rng)


class AttributeShapes(SampleDataset):
    """``num_images`` attribute images of side ``size`` over ``num_classes`` classes with
    ``attributes_per_class`` appearances each (see the module docstring).

    Items follow the VOC item format exactly (``cpal_ray.data.base``); ids are
    ``attributes_<split>_<i:05d>``; ``split`` is "train" or "val" (different images).
    """

    def __init__(self, num_classes: int = 6, num_images: int = 256, size: int = 96, attributes_per_class: int = 4,
                 *, split: str = "train", seed: int = 0, transform=None, return_rgb: bool = False):
        super().__init__(transform, return_rgb, seed)
        if split not in SPLIT_CODES:
            raise ValueError(f"attributes split must be 'train' or 'val', got {split!r}")
        if not 1 <= num_classes <= 254:
            raise ValueError(f"attributes num_classes must be in 1..254, got {num_classes}")
        if not 2 <= attributes_per_class <= 16:
            raise ValueError(f"attributes_per_class must be in 2..16, got {attributes_per_class}")
        if num_images < 1 or size < 32:
            raise ValueError(f"attributes needs num_images >= 1 and size >= 32, got {num_images}, {size}")
        self.num_classes, self.size, self.split = int(num_classes), int(size), split
        self.attributes_per_class = int(attributes_per_class)
        self.class_names = attribute_class_names(self.num_classes)
        self.ids = [f"attributes_{split}_{i:05d}" for i in range(num_images)]

    @classmethod
    def from_config(cls, data_cfg, split: str, train: bool, return_rgb: bool = False) -> "AttributeShapes":
        """Sized by data_cfg.synthetic_classes / synthetic_images / synthetic_size and
        data_cfg.attributes_per_class; seed = data_cfg.seed."""
        transform = TrainTransform.from_config(data_cfg) if train else EvalTransform()
        return cls(data_cfg.synthetic_classes, data_cfg.synthetic_images, data_cfg.synthetic_size,
                   data_cfg.attributes_per_class, split=split, seed=data_cfg.seed, transform=transform,
                   return_rgb=return_rgb)

    def _render(self, index: int):
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], index, 0xA7723])
        return render_attributes(self.num_classes, self.attributes_per_class, self.size, rng)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._render(index)[:3]

    def parts(self, index: int) -> np.ndarray:
        """Appearance id of every pixel of image ``index`` before augmentation, int16 (S, S); -1 = clutter."""
        return self._render(index)[3]

    def roles(self) -> dict[str, list[int]]:
        """Appearance ids by role: "signature", "rare" (unique, non-signature), "shared", "background"."""
        n, a = self.num_classes, self.attributes_per_class
        table = [class_attributes(c, n, a) for c in range(n)]
        return {"signature": [t[0] for t in table], "rare": [i for t in table for i in t[1:-1]],
                "shared": sorted({t[-1] for t in table}), "background": background_appearances(n, a)}
