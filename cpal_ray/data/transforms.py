"""Paired (image, mask) transforms: one small class per operation, two presets.

Geometric operations work on the uint8 photo ``rgb`` (H, W, 3) and the mask (H, W) (any integer
dtype; 0 background, 1..N classes, 255 ignore) as numpy arrays. ``Normalize`` turns them into
tensors: image float32 (3, H, W) ImageNet-normalised, mask int64 (H, W). ``RandomCrop`` then
works on tensors, padding the image with 0 (the mean colour after normalisation) and the mask
with 255.

Randomness comes only from the ``rng`` argument (a numpy Generator, an int seed or a torch
Generator), so the same rng gives the same output; there is no hidden global state.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


def as_rng(rng: np.random.Generator | int | torch.Generator | None) -> np.random.Generator:
    """A numpy Generator from a Generator (returned as is), an int seed, a torch Generator
    (one draw from it seeds the numpy one) or None (fresh OS entropy: not reproducible)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (), generator=rng)))
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy/torch Generator, an int or None, got {type(rng).__name__}")


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) array to size (h, w), dtype kept.

    Output pixel (i, j) takes input pixel (floor((i + .5) H / h), floor((j + .5) W / w)).
    """
    H, W = mask.shape[:2]
    h, w = size
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)
    return mask[rows[:, None], cols[None, :]]


def fit_long_side(hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(H, W) scaled so the long side is at most ``max_side`` (aspect kept, sides rounded, at least
    1); unchanged when it already fits or ``max_side <= 0``."""
    h, w = int(hw[0]), int(hw[1])
    if max_side <= 0 or max(h, w) <= max_side:
        return h, w
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_bilinear(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, 3) photo to size (h, w) (PIL)."""
    h, w = size
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


class RandomLongSideResize:
    """Rescale so the long side is an integer drawn uniformly from [min_long, max_long].

    rgb (H, W, 3) uint8 -> (h, w, 3) bilinear; mask (H, W) -> (h, w) nearest; aspect kept.
    """

    def __init__(self, min_long: int, max_long: int):
        if not 0 < min_long <= max_long:
            raise ValueError(f"RandomLongSideResize needs 0 < min_long <= max_long, got {min_long}, {max_long}")
        self.min_long, self.max_long = int(min_long), int(max_long)

    def __call__(self, rgb: np.ndarray, mask: np.ndarray, rng=None) -> tuple[np.ndarray, np.ndarray]:
        long_side = int(as_rng(rng).integers(self.min_long, self.max_long, endpoint=True))
        H, W = mask.shape
        scale = long_side / max(H, W)
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        if size == (H, W):
            return rgb, mask
        return resize_bilinear(rgb, size), resize_nearest(mask, size)


class RandomHFlip:
    """Mirror rgb (H, W, 3) and mask (H, W) left-right together with probability p."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHFlip needs 0 <= p <= 1, got {p}")
        self.p = float(p)

    def __call__(self, rgb: np.ndarray, mask: np.ndarray, rng=None) -> tuple[np.ndarray, np.ndarray]:
        if as_rng(rng).random() < self.p:
            return np.ascontiguousarray(rgb[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
        return rgb, mask


class Normalize:
    """uint8 rgb (H, W, 3) -> float32 tensor (3, H, W) ``(x / 255 - mean) / std``;
    mask (H, W) -> int64 tensor (H, W)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, rgb: np.ndarray, mask: np.ndarray, rng=None) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1)
        image = (image - self.mean) / self.std
        return image.contiguous(), torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())


@dataclass(frozen=True)
class CropWindow:
    """Where a crop reads from the source (src_y, src_x) and writes into the size×size output
    (dst_y, dst_x), over an h×w region. A side shorter than size is padded, placed at a random
    offset; a longer side is cut at a random offset."""
    src_y: int
    src_x: int
    dst_y: int
    dst_x: int
    h: int
    w: int


class RandomCrop:
    """Random size×size crop; image (3, H, W) padded with 0, mask (H, W) padded with 255."""

    def __init__(self, size: int, ignore_index: int = IGNORE_INDEX):
        if size <= 0:
            raise ValueError(f"RandomCrop needs size > 0, got {size}")
        self.size, self.ignore_index = int(size), int(ignore_index)

    def window(self, H: int, W: int, rng=None) -> CropWindow:
        """Draw the crop window for a (H, W) input."""
        g = as_rng(rng)
        S = self.size

        def axis(n: int) -> tuple[int, int, int]:  # (src, dst, length)
            off = int(g.integers(0, abs(n - S), endpoint=True))
            return (off, 0, S) if n >= S else (0, off, n)

        sy, dy, h = axis(H)
        sx, dx, w = axis(W)
        return CropWindow(sy, sx, dy, dx, h, w)

    def apply(self, arr, win: CropWindow, fill):
        """Crop/pad one array with window ``win``: tensor (C, H, W) or (H, W), or numpy
        (H, W, C) or (H, W) -> the same layout with spatial size (size, size)."""
        S = self.size
        if isinstance(arr, torch.Tensor):
            out = arr.new_full((*arr.shape[:-2], S, S), fill)
            out[..., win.dst_y:win.dst_y + win.h, win.dst_x:win.dst_x + win.w] = \
                arr[..., win.src_y:win.src_y + win.h, win.src_x:win.src_x + win.w]
            return out
        out = np.full((S, S, *arr.shape[2:]), fill, dtype=arr.dtype)
        out[win.dst_y:win.dst_y + win.h, win.dst_x:win.dst_x + win.w] = \
            arr[win.src_y:win.src_y + win.h, win.src_x:win.src_x + win.w]
        return out

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng=None) -> tuple[torch.Tensor, torch.Tensor]:
        win = self.window(*mask.shape[-2:], rng)
        return self.apply(image, win, 0.0), self.apply(mask, win, self.ignore_index)


class TrainTransform:
    """Training preset (paper Sec. 4.1): random long-side resize, horizontal flip, normalise,
    random crop (image pad 0, mask pad 255).

    ``__call__(rgb (H, W, 3) uint8, mask (H, W), rng)`` -> (image float32 (3, S, S), mask int64
    (S, S), rgb uint8 (S, S, 3) with the same geometry, padding black) where S = crop_size.
    """

    def __init__(self, resize_long: tuple[int, int] = (320, 640), crop_size: int = 512, hflip: bool = True):
        self.resize = RandomLongSideResize(*resize_long)
        self.flip = RandomHFlip(0.5 if hflip else 0.0)
        self.normalize = Normalize()
        self.crop = RandomCrop(crop_size)

    @classmethod
    def from_config(cls, data_cfg) -> "TrainTransform":
        """Build from a ``DataConfig`` (resize_long, crop_size, hflip)."""
        return cls(tuple(data_cfg.resize_long), data_cfg.crop_size, data_cfg.hflip)

    def __call__(self, rgb: np.ndarray, mask: np.ndarray, rng=None):
        g = as_rng(rng)
        rgb, mask = self.resize(rgb, mask, g)
        rgb, mask = self.flip(rgb, mask, g)
        image, mask_t = self.normalize(rgb, mask)
        win = self.crop.window(*mask_t.shape, g)
        return (self.crop.apply(image, win, 0.0), self.crop.apply(mask_t, win, IGNORE_INDEX),
                self.crop.apply(np.asarray(rgb), win, 0))


class EvalTransform:
    """Evaluation preset: normalise only, original size kept.

    ``__call__(rgb (H, W, 3) uint8, mask (H, W), rng=None)`` -> (image float32 (3, H, W),
    mask int64 (H, W), rgb unchanged).
    """

    def __init__(self):
        self.normalize = Normalize()

    @classmethod
    def from_config(cls, data_cfg=None) -> "EvalTransform":
        return cls()

    def __call__(self, rgb: np.ndarray, mask: np.ndarray, rng=None):
        image, mask_t = self.normalize(rgb, mask)
        return image, mask_t, rgb
