"""Seed / pseudo-label / segmentation mIoU: one dataset-level confusion matrix (IRN's rule).

- ``ConfusionMatrix`` accumulates (gt, pred) pairs with ``np.bincount``, skipping ``ignore_index``.
  ``merge`` (or ``+=``) adds another matrix: the reduce across workers is separate from
  ``compute``, which turns the counts into IoU = TP / (TP + FP + FN) per class and the mIoU over
  the classes that occur in the ground truth or in the prediction.
- ``cams_to_label`` turns normalised CAMs into a label map with a constant background score.
- ``ThresholdSweep`` keeps one ``ConfusionMatrix`` per background threshold (the usual
  0.00-0.60 seed sweep) and ``write_report`` saves its results as JSON, Markdown and a plot.

Class indices include background: 0 = background, 1..N = foreground, so ``num_classes`` = N + 1
(21 for VOC, 81 for COCO). CAMs are indexed by foreground class c in 0..N-1, label c + 1.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable

import numpy as np

from cpal_ray.inference.io import atomic_write_bytes
from cpal_ray.inference.writers import markdown_table, save_figure
from cpal_ray.formatting import pct, strict_json
from cpal_ray.storage import Location, location


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array or a torch tensor (moved to CPU), without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Dataset-level confusion matrix: ``mat[g, p]`` = pixels with ground truth g predicted p.

    Args:
        num_classes: classes including background (21 for VOC).
        ignore_index: ground-truth value that is skipped (VOC boundaries: 255).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.mat[:] = 0

    def update(self, pred: Any, gt: Any, ignore_pred: bool = False) -> "ConfusionMatrix":
        """Add one image (or a batch). pred, gt: integer arrays/tensors of the same shape.

        Pixels whose gt is ``ignore_index`` are skipped. ``ignore_pred`` also skips pixels whose
        prediction is ``ignore_index`` (accuracy on the confident region of a pseudo-label);
        otherwise a prediction outside 0..num_classes-1 at a counted pixel raises, as does a gt
        value that is neither a class nor ``ignore_index`` (a wrong ``num_classes``).
        """
        pred, gt = _to_numpy(pred), _to_numpy(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
        pred = pred.reshape(-1).astype(np.int64, copy=False)
        gt = gt.reshape(-1).astype(np.int64, copy=False)
        keep = gt != self.ignore_index
        if ignore_pred:
            keep &= pred != self.ignore_index
        pred, gt = pred[keep], gt[keep]
        n = self.num_classes
        if gt.size:
            if gt.min() < 0 or gt.max() >= n:
                raise ValueError(f"gt values must be in 0..{n - 1} or {self.ignore_index}, "
                                 f"got [{gt.min()}, {gt.max()}]")
            if pred.min() < 0 or pred.max() >= n:
                raise ValueError(f"pred values must be in 0..{n - 1} at counted pixels, "
                                 f"got [{pred.min()}, {pred.max()}]")
            self.mat += np.bincount(n * gt + pred, minlength=n * n).reshape(n, n)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (reduce across workers); returns self."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.mat += other.mat
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def compute(self) -> dict[str, Any]:
        """Scores from the counts.

        Returns ``miou`` (float: mean IoU over ``present`` classes; NaN when none),
        ``iou`` (num_classes,) float64 with NaN where a class is in neither gt nor pred,
        ``present`` (num_classes,) bool, ``pixel_acc`` (float; NaN with no pixels), ``pixels``
        (int, counted pixels), ``fg_fraction`` and ``gt_fg_fraction`` (the shares of counted
        pixels predicted / labelled foreground, i.e. not class 0: coverage, beside localisation).
        """
        tp = np.diag(self.mat).astype(np.float64)
        fp = self.mat.sum(0) - tp
        fn = self.mat.sum(1) - tp
        denom = tp + fp + fn
        present = denom > 0
        iou = np.full(self.num_classes, np.nan)
        iou[present] = tp[present] / denom[present]
        total = int(self.mat.sum())
        return {
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "iou": iou,
            "present": present,
            "pixel_acc": float(tp.sum() / total) if total else math.nan,
            "pixels": total,
            "fg_fraction": float(1.0 - self.mat[:, 0].sum() / total) if total else math.nan,
            "gt_fg_fraction": float(1.0 - self.mat[0].sum() / total) if total else math.nan,
        }


def cams_to_label(cams: np.ndarray, classes: np.ndarray, threshold: float) -> np.ndarray:
    """Seed label map: argmax over [background = threshold, cams] (background wins ties).

    cams: (K, H, W) float, normalised to [0, 1]; classes: (K,) int foreground indices in 0..N-1;
    threshold: the constant background score. Returns (H, W) int64 in {0} ∪ {classes + 1}.
    """
    cams = np.asarray(cams, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != classes.shape[0]:
        raise ValueError(f"cams must be (K={classes.shape[0]}, H, W), got {cams.shape}")
    scores = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=threshold)
    keys = np.concatenate([[0], classes + 1])
    return keys[np.argmax(scores, axis=0)]


def own_background_label(bg: np.ndarray, cams: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Seed label map from maps that carry their own background (SIPE scores its IS-CAM this way):
    argmax over [bg, cams] with no threshold (background wins ties).

    bg: (1, H, W) or (H, W); cams: (K, H, W); classes: (K,) foreground indices -> (H, W) int64.
    """
    cams = np.asarray(cams, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    bg = np.asarray(bg, dtype=np.float32).reshape(1, *cams.shape[1:])
    if cams.ndim != 3 or cams.shape[0] != classes.shape[0]:
        raise ValueError(f"cams must be (K={classes.shape[0]}, H, W), got {cams.shape}")
    keys = np.concatenate([[0], classes + 1])
    return keys[np.argmax(np.concatenate([bg, cams]), axis=0)]


def sweep_thresholds(start: float, stop: float, step: float) -> tuple[float, ...]:
    """start, start + step, ..., stop (inclusive when on the grid), rounded to 10 decimals.

    The count is floor((stop - start) / step + 1e-9) + 1 so that 0.6 / 0.01 = 59.999... still
    gives 61 thresholds, and each value is start + i * step rounded so 0.07 prints as 0.07.
    """
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    if stop < start:
        raise ValueError(f"stop {stop} < start {start}")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    return tuple(min(round(start + i * step, 10), stop) for i in range(n))


def thresholds_from_config(cfg) -> tuple[float, ...]:
    """Thresholds of an ``InferenceConfig``: just ``fixed_threshold`` when it is >= 0, else the sweep."""
    if cfg.fixed_threshold >= 0:
        return (float(cfg.fixed_threshold),)
    return sweep_thresholds(cfg.threshold_start, cfg.threshold_stop, cfg.threshold_step)


class ThresholdSweep:
    """One ``ConfusionMatrix`` per background threshold, filled from CAMs in a single pass.

    Args:
        num_classes: classes including background.
        thresholds: background scores to evaluate (sorted, duplicates removed).
        ignore_index: skipped ground-truth value.
    """

    def __init__(self, num_classes: int, thresholds: Iterable[float], ignore_index: int = 255):
        thr = np.unique(np.asarray(list(thresholds), dtype=np.float64))
        if thr.size == 0:
            raise ValueError("thresholds must not be empty")
        self.thresholds = tuple(float(t) for t in thr)
        # Compared in float32, the dtype ``cams_to_label`` compares in.
        self._thr32 = thr.astype(np.float32)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrices = [ConfusionMatrix(num_classes, ignore_index) for _ in self.thresholds]

    @classmethod
    def from_config(cls, num_classes: int, cfg, ignore_index: int = 255) -> "ThresholdSweep":
        """From an ``InferenceConfig`` (threshold_start/stop/step or fixed_threshold)."""
        return cls(num_classes, thresholds_from_config(cfg), ignore_index)

    def update(self, cams: np.ndarray, classes: np.ndarray, gt: Any) -> "ThresholdSweep":
        """Add one image. cams: (K, H, W) normalised; classes: (K,) in 0..N-1; gt: (H, W).

        Equivalent to ``matrices[t].update(cams_to_label(cams, classes, thr[t]), gt)`` for every
        t, in one pass: a pixel is foreground at threshold t iff max_k cams > thr[t], i.e. for the
        first j thresholds where j = #{t : thr[t] < max}. One bincount over (j, gt, fg class)
        and cumulative sums over j give every matrix.
        """
        cams = np.asarray(cams, dtype=np.float32)
        classes = np.asarray(classes, dtype=np.int64).reshape(-1)
        gt = _to_numpy(gt)
        if cams.ndim != 3 or cams.shape[0] != classes.shape[0] or cams.shape[1:] != gt.shape:
            raise ValueError(f"cams {cams.shape} must be (K={classes.shape[0]}, *gt.shape={gt.shape})")
        n, T = self.num_classes, len(self.thresholds)
        if classes.size and (classes.min() < 0 or classes.max() + 1 >= n):
            raise ValueError(f"classes must be in 0..{n - 2}, got {classes.tolist()}")
        gt = gt.reshape(-1).astype(np.int64)
        keep = gt != self.ignore_index
        gt = gt[keep]
        if gt.size and (gt.min() < 0 or gt.max() >= n):
            raise ValueError(f"gt values must be in 0..{n - 1} or {self.ignore_index}, got [{gt.min()}, {gt.max()}]")
        if classes.size:
            flat = cams.reshape(cams.shape[0], -1)[:, keep]
            fg = classes[np.argmax(flat, axis=0)] + 1
            j = np.searchsorted(self._thr32, flat.max(axis=0), side="left")
        else:
            fg = np.zeros_like(gt)
            j = np.zeros_like(gt)
        hist = np.bincount((j * n + gt) * n + fg, minlength=(T + 1) * n * n).reshape(T + 1, n, n)
        # Foreground at threshold t: pixels with j > t -> reverse cumulative sum over j.
        fg_counts = np.cumsum(hist[::-1], axis=0)[::-1][1:]           # (T, n, n), j >= t + 1
        bg_counts = np.cumsum(hist.sum(axis=2), axis=0)[:T]            # (T, n), j <= t
        for t, m in enumerate(self.matrices):
            m.mat += fg_counts[t]
            m.mat[:, 0] += bg_counts[t]
        return self

    def merge(self, other: "ThresholdSweep") -> "ThresholdSweep":
        """Add another sweep over the same thresholds (reduce across workers); returns self."""
        if other.thresholds != self.thresholds:
            raise ValueError("cannot merge sweeps over different thresholds")
        for m, o in zip(self.matrices, other.matrices):
            m.merge(o)
        return self

    def __iadd__(self, other: "ThresholdSweep") -> "ThresholdSweep":
        return self.merge(other)

    def results(self) -> dict[str, Any]:
        """``thresholds`` and ``miou`` (lists, one per threshold), ``best_threshold``,
        ``best_miou`` (the first maximum: the lowest threshold wins a tie), and at the best
        threshold ``iou`` (list, NaN = class absent), ``present`` (list of bool), ``pixel_acc``,
        ``fg_fraction`` (share of pixels the seeds call foreground) and ``gt_fg_fraction``;
        ``threshold_at_edge``: the best threshold is the first or last of a sweep of several, so
        the optimum may lie outside the range (widen ``inference.threshold_start/stop``).
        """
        scores = [m.compute() for m in self.matrices]
        curve = np.array([s["miou"] for s in scores])
        best = int(np.nanargmax(curve)) if np.isfinite(curve).any() else 0
        return {
            "thresholds": list(self.thresholds),
            "miou": curve.tolist(),
            "best_threshold": self.thresholds[best],
            "best_miou": float(curve[best]),
            "iou": scores[best]["iou"].tolist(),
            "present": scores[best]["present"].tolist(),
            "pixel_acc": scores[best]["pixel_acc"],
            "fg_fraction": scores[best]["fg_fraction"],
            "gt_fg_fraction": scores[best]["gt_fg_fraction"],
            "threshold_at_edge": len(self.thresholds) > 1 and best in (0, len(self.thresholds) - 1),
        }


def write_report(results: dict[str, Any], out_dir, class_names: list[str]) -> dict[str, Location]:
    """Save ``ThresholdSweep.results()`` as ``seeds.json``, ``seeds.md`` and ``miou_vs_threshold.png``.

    class_names: one name per class including background (len == len(results["iou"])).
    Returns {"json", "md", "png"} -> paths. Each file is written atomically.
    """
    if len(class_names) != len(results["iou"]):
        raise ValueError(f"{len(class_names)} class names for {len(results['iou'])} classes")
    out = location(out_dir)
    payload = dict(results, class_names=list(class_names))
    paths = {"json": out / "seeds.json", "md": out / "seeds.md", "png": out / "miou_vs_threshold.png"}
    atomic_write_bytes(paths["json"], strict_json(payload, indent=2).encode())

    lines = [
        "# Seed mIoU",
        "",
        f"- best mIoU: **{pct(results['best_miou'], 2)}** at background threshold "
        f"**{results['best_threshold']:.2f}**",
        f"- pixel accuracy at that threshold: {pct(results['pixel_acc'], 2)}",
        *(["- **the best threshold is at the end of the swept range: the optimum may lie outside it "
            "(widen inference.threshold_start/stop)**"] if results.get("threshold_at_edge") else []),
        f"- thresholds evaluated: {len(results['thresholds'])} "
        f"({results['thresholds'][0]:.2f} .. {results['thresholds'][-1]:.2f})",
        "",
        *markdown_table(["class", "IoU (%)"], [[name, pct(v, 2)] for name, v in zip(class_names, results["iou"])], "lr"),
    ]
    atomic_write_bytes(paths["md"], ("\n".join(lines) + "\n").encode())

    save_figure(threshold_figure(results), paths["png"], dpi=100, tight=False)
    return paths


def threshold_figure(results: dict[str, Any]):
    """``miou_vs_threshold.png``: the mIoU curve, the best threshold, how many images were scored."""
    # A Figure directly (saved by ``save_figure`` on the Agg canvas): no pyplot, no global backend switch.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(results["thresholds"], [100 * v for v in results["miou"]], marker=".")
    ax.axvline(results["best_threshold"], color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    images = results.get("images")
    ax.set_title(f"seed mIoU of {images if images is not None else '?'} images: best {pct(results['best_miou'], 2)} "
                 f"at {results['best_threshold']:.2f}")
    ax.grid(True, alpha=0.3)
    return fig
