"""PNG figures the workflows write: image grids, the support bank, per-class IoU, mIoU curves.

Figures are drawn on a ``Figure`` with the Agg canvas directly, so library code never switches
matplotlib's global backend.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cpal_ray.data.classes import voc_palette
from cpal_ray.inference.writers import save_figure


def colour_labels(label: np.ndarray) -> np.ndarray:
    """(H, W) label map with 255 = ignore -> (H, W, 3) uint8 in the VOC palette (ignore = white)."""
    return voc_palette()[np.asarray(label, dtype=np.uint8)]


def max_map(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Max over classes of (K, H, W) maps; zeros of ``size`` when K == 0."""
    return cams.max(0) if len(cams) else np.zeros(size, dtype=np.float32)


def image_grid(rows: list[dict], path: str | Path, columns=("photo", "cam", "pacam", "pseudo", "seg", "gt")) -> Path:
    """One row per image: photo, CAM, PACAM, pseudo-label, segmenter, ground truth side by side.

    rows: dicts with "id", "photo" (H, W, 3) uint8, "cam"/"pacam" (H, W) float in [0, 1] (max over
    the image's classes), "pseudo"/"seg"/"gt" (H, W) label maps; a missing entry leaves its cell blank.
    """
    titles = {"photo": "photo", "cam": "CAM", "pacam": "PACAM", "pseudo": "pseudo-label", "seg": "segmenter",
              "gt": "ground truth"}
    fig = Figure(figsize=(2.4 * len(columns), 2.2 * max(len(rows), 1)), dpi=100)
    for r, row in enumerate(rows):
        for c, key in enumerate(columns):
            ax = fig.add_subplot(len(rows), len(columns), r * len(columns) + c + 1)
            ax.axis("off")
            if r == 0:
                ax.set_title(titles.get(key, key), fontsize=9)
            value = row.get(key)
            if value is None:
                continue
            if key == "photo":
                ax.imshow(value)
                ax.text(2, 12, row.get("id", ""), color="white", fontsize=6, backgroundcolor="black")
            elif key in ("cam", "pacam"):
                if row.get("photo") is not None:
                    ax.imshow(row["photo"])
                ax.imshow(value, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            else:
                ax.imshow(colour_labels(value), interpolation="nearest")
    return save_figure(fig, path)


def pca_2d(x: np.ndarray, basis_from: np.ndarray | None = None) -> np.ndarray:
    """Project rows of x onto the top-2 principal axes of ``basis_from`` (default x)."""
    ref = x if basis_from is None else basis_from
    mean = ref.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(ref - mean, full_matrices=False)
    return (x - mean) @ vt[:2].T


def bank_plot(bank_state: dict, class_names, path: str | Path, max_per_class: int = 300) -> Path:
    """PCA of the support bank's prototypes coloured by class, its context prototypes marked (x).

    bank_state: ``PrototypeBank.state_dict()`` (its "context": {"prototypes" (N, P, D), "counts"
    (N,)} or None before the first clustering).
    """
    context = bank_state.get("context")
    data, size = bank_state["data"].numpy(), bank_state["size"].numpy()
    pts, cls = [], []
    for c in range(data.shape[0]):
        n = int(size[c])
        if n:
            take = data[c, :n][-max_per_class:]
            pts.append(take)
            cls.append(np.full(len(take), c))
    fig = Figure(figsize=(6.5, 5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if not pts:
        ax.text(0.5, 0.5, "bank is empty", ha="center")
        return save_figure(fig, path)
    x, cls = np.concatenate(pts), np.concatenate(cls)
    xy = pca_2d(x)
    palette = voc_palette()[1:].astype(float) / 255.0
    for c in np.unique(cls):
        sel = cls == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.5, color=palette[c % len(palette)], label=class_names[c])
    if context is not None:
        protos, counts = context["prototypes"].numpy(), context["counts"].numpy()
        for c in range(protos.shape[0]):
            if counts[c]:
                cxy = pca_2d(protos[c, : counts[c]], basis_from=x)
                ax.scatter(cxy[:, 0], cxy[:, 1], marker="x", s=40, color=palette[c % len(palette)],
                           linewidths=1.5)
    ax.set_title("support bank (PCA): dots = instance prototypes, x = context prototypes", fontsize=9)
    ax.legend(fontsize=6, markerscale=2, loc="best", ncol=2)
    return save_figure(fig, path)


def iou_bars(results: dict[str, dict], class_names, path: str | Path) -> Path:
    """Per-class IoU bars, one bar group per class, one colour per run (e.g. baseline vs CPAL).

    results: {run name: results dict with "iou" (N+1,) including background at index 0}.
    """
    names = ["background", *class_names]
    fig = Figure(figsize=(max(6, 0.45 * len(names)), 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(results), 1)
    for i, (run, res) in enumerate(results.items()):
        iou = np.nan_to_num(np.asarray(res["iou"], dtype=float), nan=0.0)
        ax.bar(np.arange(len(iou)) + i * width, iou, width, label=f"{run} (mIoU {res['best_miou']:.3f})")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def miou_curves(results: dict[str, dict], path: str | Path) -> Path:
    """mIoU vs background threshold, one line per run."""
    fig = Figure(figsize=(5.5, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for run, res in results.items():
        ax.plot(res["thresholds"], res["miou"], label=f"{run} (best {res['best_miou']:.3f} @ {res['best_threshold']:.2f})")
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# Per-epoch quantities of a run's history shown by ``diagnostic_curves``: (title, [(key, label)]).
DIAGNOSTIC_PANELS = (
    ("losses", [("bce", "BCE"), ("self", "L_self")]),
    ("learning rate (end of epoch)", [("lr", "lr")]),
    ("share in L_self", [("self_image_share", "images"), ("self_class_share", "(image, class) pairs")]),
    ("seed mIoU, training subsample", [("diag_cam_miou", "CAM"), ("diag_pacam_miou", "PACAM")]),
    ("object / background mean", [("diag_cam_ratio", "CAM"), ("diag_pacam_ratio", "PACAM")]),
    ("CAM vs PACAM", [("diag_agreement_iou", "IoU of > 0.5"), ("diag_agreement_l1", "mean |diff|")]),
    ("bank", [("bank_fill_mean", "entries per class (mean)"), ("classes_below_k_count", "classes < K")]),
)


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one per-epoch quantity; list-valued records give a mean or a count."""
    xs, ys = [], []
    for rec in history:
        if key == "bank_fill_mean":  # lists, or NaN in a table row of a run without a bank
            fill = rec.get("bank_fill")
            value = float(np.mean(fill)) if isinstance(fill, (list, tuple, np.ndarray)) else None
        elif key == "classes_below_k_count":
            below = rec.get("classes_below_k")
            value = len(below) if isinstance(below, (list, tuple, np.ndarray)) else None
        else:
            value = rec.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value):
            xs.append(int(rec["epoch"]))
            ys.append(float(value))
    return xs, ys


# What an empty panel says (the panels whose keys start so): why it has no line.
EMPTY_NOTES = {"diag_": "not measured in this run:\ntrain.diag_images=0 (set it > 0 to\nscore CAM and PACAM while training)",
               "bank_": "no prototype bank in this run\n(cpal.enabled=false)"}


def diagnostic_curves(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """What CPAL did, epoch by epoch, one line style per run (e.g. baseline vs CPAL): losses, the
    learning rate, the share of images and classes in L_self, the seed mIoU of CAM and PACAM on
    training images, their object/background contrast and agreement, and the bank
    (``engine.diagnostics_hook``). The title names the runs; a panel without data says why."""
    return save_figure(curves_figure(histories), path)


def curves_figure(histories: dict[str, list[dict]]) -> Figure:
    """The figure of ``diagnostic_curves`` (whole epochs on every x axis)."""
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(17, 6.5), dpi=100)
    styles = ["-", "--", ":", "-."]
    for p, (title, keys) in enumerate(DIAGNOSTIC_PANELS):
        ax = fig.add_subplot(2, 4, p + 1)
        for r, (run, history) in enumerate(histories.items()):
            for k, (key, label) in enumerate(keys):
                xs, ys = _series(history, key)
                if xs:
                    ax.plot(xs, ys, styles[r % len(styles)], color=f"C{k}", marker=".", label=f"{label} ({run})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
        else:
            note = next((n for prefix, n in EMPTY_NOTES.items() if keys[0][0].startswith(prefix)), "no data in this run")
            ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=8, color="gray", transform=ax.transAxes)
    epochs = max((len(h) for h in histories.values()), default=0)
    fig.suptitle(f"{' vs '.join(histories)}: training curves ({epochs} epochs)", fontsize=11)
    fig.tight_layout()
    return fig
