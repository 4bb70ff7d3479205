"""Is the PACAM a localisation map? Contrast of CAM and PACAM on ground-truth masks.

For every (image, positive class n) pair, with the class's map M_n (H, W) in [0, 1] and the
image's ground-truth mask (0 background, n + 1 class n, 255 ignored), ``MapContrast`` adds up:

- ``fg_mean``: mean of M_n over the pixels of class n;  ``bg_mean``: over background pixels;
  ``ratio`` = fg_mean / bg_mean (the contrast; 1 = the map does not tell object from background).
- ``above``: fraction of the image's labelled pixels with M_n > 0.5; ``fg_above`` / ``bg_above``:
  the same over the class's / the background's pixels (recall and false-positive rate of the
  > 0.5 region).

and, for a pair of maps (a, b) (default CAM and PACAM), their agreement:

- ``l1``: mean |a_n − b_n| over labelled pixels (what L_self of Eq. 14 sees, foreground channels);
- ``iou``: |{a_n > 0.5} ∩ {b_n > 0.5}| / |{a_n > 0.5} ∪ {b_n > 0.5}|, summed over all pairs.

Every mean is pixel-weighted over the whole set (like a dataset-level confusion matrix), so
large objects count more than small ones.

``embedding_cosine`` measures why a cosine map can be flat: the mean cosine between two pixels
of the same image; when it is near 1 every pixel points the same way and cos(z(j), p) is nearly
constant over j, whatever the prototype p.

``contrast_report`` runs a model over a dataset and returns both, with the maps as L_self sees
them during training (Eq. 3 CAMs and Eq. 13 PACAMs on the feature grid, anchors from the image's
own CAM), upsampled bilinearly to the mask. Pure torch/numpy, no Ray.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from cpal_ray.cpal import centered_embedding, normalized_cams, prototype_aware_cam_from_outputs

IGNORE_INDEX = 255
THRESHOLD = 0.5


def _np(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


class MapContrast:
    """Accumulates the contrast of named maps and the agreement of map pairs (module docstring).

    Args:
        pairs: (a, b) map names whose agreement is measured; default (("cam", "pacam"),).
        threshold: the activation threshold of ``above`` and ``iou`` (0.5).
    """

    _KEYS = ("fg_sum", "fg_n", "bg_sum", "bg_n", "above_n", "valid_n", "fg_above_n", "bg_above_n")

    def __init__(self, pairs: Iterable[tuple[str, str]] = (("cam", "pacam"),), threshold: float = THRESHOLD):
        self.pairs = tuple(tuple(p) for p in pairs)
        self.threshold = float(threshold)
        self.sums: dict[str, dict[str, float]] = {}
        self.pair_sums: dict[tuple[str, str], dict[str, float]] = {}
        self.instances = 0

    def update(self, mask: Any, classes: Iterable[int], **maps: Any) -> "MapContrast":
        """Add one image. mask: (H, W) ints; classes: (K,) foreground indices n (mask value n + 1);
        maps: name -> (K, H, W) maps of those classes, in the same order."""
        mask = np.asarray(_np(mask) if isinstance(mask, torch.Tensor) else mask)
        classes = [int(c) for c in classes]
        arrays = {name: _np(m) for name, m in maps.items()}
        for name, m in arrays.items():
            if m.shape != (len(classes), *mask.shape):
                raise ValueError(f"map {name!r} has shape {m.shape}, expected {(len(classes), *mask.shape)}")
        valid, bg = mask != IGNORE_INDEX, mask == 0
        for k, c in enumerate(classes):
            fg = mask == c + 1
            for name, m in arrays.items():
                s = self.sums.setdefault(name, dict.fromkeys(self._KEYS, 0.0))
                on = m[k] > self.threshold
                s["fg_sum"] += float(m[k][fg].sum())
                s["fg_n"] += int(fg.sum())
                s["bg_sum"] += float(m[k][bg].sum())
                s["bg_n"] += int(bg.sum())
                s["above_n"] += int((on & valid).sum())
                s["valid_n"] += int(valid.sum())
                s["fg_above_n"] += int((on & fg).sum())
                s["bg_above_n"] += int((on & bg).sum())
            for a, b in self.pairs:
                if a in arrays and b in arrays:
                    p = self.pair_sums.setdefault((a, b), {"abs_sum": 0.0, "n": 0, "inter": 0, "union": 0})
                    ma, mb = arrays[a][k], arrays[b][k]
                    p["abs_sum"] += float(np.abs(ma - mb)[valid].sum())
                    p["n"] += int(valid.sum())
                    on_a, on_b = (ma > self.threshold) & valid, (mb > self.threshold) & valid
                    p["inter"] += int((on_a & on_b).sum())
                    p["union"] += int((on_a | on_b).sum())
            self.instances += 1
        return self

    def merge(self, other: "MapContrast") -> "MapContrast":
        """Add another accumulator's counts (e.g. from another worker)."""
        for name, s in other.sums.items():
            mine = self.sums.setdefault(name, dict.fromkeys(self._KEYS, 0.0))
            for key, v in s.items():
                mine[key] += v
        for pair, s in other.pair_sums.items():
            mine = self.pair_sums.setdefault(pair, {"abs_sum": 0.0, "n": 0, "inter": 0, "union": 0})
            for key, v in s.items():
                mine[key] += v
        self.instances += other.instances
        return self

    def compute(self) -> dict:
        """{name: {fg_mean, bg_mean, ratio, above, fg_above, bg_above}, "a_vs_b": {l1, iou},
        "instances": (image, class) pairs}; NaN where a denominator is 0 (ratio: inf when only
        the background mean is 0)."""
        def div(a, b):
            return a / b if b else float("nan")

        def ratio(fg, bg):
            if math.isnan(fg) or math.isnan(bg):
                return float("nan")
            if bg > 0:
                return fg / bg
            return float("inf") if fg > 0 else float("nan")

        out: dict[str, Any] = {"instances": self.instances}
        for name, s in self.sums.items():
            fg, bg = div(s["fg_sum"], s["fg_n"]), div(s["bg_sum"], s["bg_n"])
            out[name] = {"fg_mean": fg, "bg_mean": bg, "ratio": ratio(fg, bg),
                         "above": div(s["above_n"], s["valid_n"]), "fg_above": div(s["fg_above_n"], s["fg_n"]),
                         "bg_above": div(s["bg_above_n"], s["bg_n"])}
        for (a, b), s in self.pair_sums.items():
            out[f"{a}_vs_{b}"] = {"l1": div(s["abs_sum"], s["n"]), "iou": div(s["inter"], s["union"])}
        return out


def embedding_cosine(z: torch.Tensor) -> torch.Tensor:
    """Mean cosine between two pixels' embeddings of each image (self-pairs included).

    With unit vectors ẑ(j), mean_{j,k} ẑ(j)·ẑ(k) = ||mean_j ẑ(j)||², so no (hw)² matrix is built.
    z: (B, D, h, w) -> (B,) in [0, 1]; 1 = all pixels parallel, ~0 = no common direction.
    """
    unit = F.normalize(z.flatten(2).float(), dim=1)  # (B, D, hw)
    return unit.mean(dim=2).pow(2).sum(dim=1)


def training_maps(out: dict, labels: torch.Tensor, cpal_cfg, context: torch.Tensor | None = None,
                  counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The maps L_self compares, from a forward's outputs: {"cam": M (B, N, h, w) (Eq. 3),
    "pacam": M~ (B, N, h, w) (Eq. 13, anchors from the batch's own CAMs) when context is given
    (or needs none: ``cpal.context = instance``), "embedding": the embedding the cosines use (B, D, h, w)}."""
    maps = {"cam": normalized_cams(out["cams"], labels), "embedding": centered_embedding(out["z"], cpal_cfg.center)}
    if context is not None or cpal_cfg.own_prototypes:
        pacam = prototype_aware_cam_from_outputs(out["z"], out["cams"], labels, context, counts, cpal_cfg)
        maps["pacam"] = pacam[:, :labels.shape[1]]  # the foreground maps (a background prototype's is last)
    return maps


def _batches(dataset, max_images: int, batch_size: int):
    """Consecutive same-size items of ``dataset``, at most ``batch_size`` per batch."""
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    batch: list[dict] = []
    for i in range(n):
        item = dataset[i]
        if batch and (len(batch) == batch_size or item["image"].shape != batch[0]["image"].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@torch.inference_mode()
def contrast_report(model: torch.nn.Module, dataset, cpal_cfg, context=None, *, max_images: int = 0,
                    batch_size: int = 8, device: torch.device | str = "cpu") -> dict:
    """``MapContrast`` of CAM and PACAM over ``dataset`` (items with "image", "label", "mask"),
    plus ``embedding_cosine`` (mean over images) and the mean CAM / PACAM values L_self sees.

    context: a ``cpal_ray.cpal.Context`` (prototypes, counts) or None (CAM only). Only classes
    with context prototypes are counted, so CAM and PACAM are scored on the same pairs.
    Same-size consecutive items share a forward (the alignment of Eq. 12 averages over it, as
    in training); eval-mode model.
    """
    net = model.module if hasattr(model, "module") else model
    was_training = net.training
    net.eval()
    acc = MapContrast()
    cosines = []
    ctx = counts = None
    if context is not None:
        ctx, counts = context.prototypes.to(device), context.counts.to(device)
    try:
        for batch in _batches(dataset, max_images, batch_size):
            x = torch.stack([b["image"] for b in batch]).to(device)
            labels = torch.stack([b["label"] for b in batch]).to(device)
            out = net(x)
            maps = training_maps(out, labels, cpal_cfg, ctx, counts)
            cosines.append(embedding_cosine(maps.pop("embedding")).cpu())
            size = tuple(x.shape[-2:])
            up = {k: F.interpolate(v.float(), size=size, mode="bilinear", align_corners=False) for k, v in maps.items()}
            for i, item in enumerate(batch):
                keep = labels[i] > 0
                if counts is not None:
                    keep &= counts[:keep.shape[0]].to(keep.device) > 0
                classes = torch.nonzero(keep).flatten()
                if classes.numel():
                    acc.update(item["mask"], classes.tolist(), **{k: v[i, classes] for k, v in up.items()})
    finally:
        net.train(was_training)
    res = acc.compute()
    res["embedding_cosine"] = float(torch.cat(cosines).mean()) if cosines else float("nan")
    return res
