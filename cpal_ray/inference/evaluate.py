"""Scoring against the ground truth (no Ray): one dataset-level confusion matrix.

- ``evaluate_seeds``: seed mIoU of a model's multi-scale CAMs (or PACAMs) over a dataset,
  computed in memory (training-time checks, sweeps).
- ``evaluate_cam_dir``: seed mIoU of a folder of CAM files (``<dir>/<id>.npz``) with the
  background-threshold sweep of ``InferenceConfig`` (or its fixed threshold).
- ``evaluate_labels``: mIoU of a folder of label PNGs (``<dir>/<id>.png``). Pixels whose ground
  truth is 255 are skipped, and so are pixels the pseudo-label marks 255 (IRN's "ignore"):
  the score is the accuracy on the confident region, reported with the ignored fraction.

An image whose file is missing or bad, or that has no ground-truth mask, is left out and listed
under ``errors`` (id first; counted in ``n_errors``): it is never scored as an all-ignore image.
The others are still scored. ``write_json`` saves a result as strict JSON (NaN -> null).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from cpal_ray.data.classes import positive_classes
from cpal_ray.formatting import pct, progress, strict_json
from cpal_ray.inference.io import atomic_write_bytes, cam_path, load_cams_npz, load_label_png
from cpal_ray.inference.multiscale import multiscale_cams
from cpal_ray.inference.pseudo import IGNORE
from cpal_ray.inference.writers import markdown_table
from cpal_ray.storage import Location, location
from cpal_ray.inference.metrics import (ConfusionMatrix, ThresholdSweep, own_background_label,
                                        thresholds_from_config)

# Errors kept in a result (the count is always complete).
MAX_LISTED_ERRORS = 100


def _names(dataset) -> list[str]:
    return ["background", *dataset.class_names]


def _record(errors: list, n_errors: int, sid: str, e: BaseException) -> int:
    if len(errors) < MAX_LISTED_ERRORS:
        errors.append(f"id {sid}: {type(e).__name__}: {e}")
    return n_errors + 1


# What a seed evaluation reports per map, beside the full result of the chosen one.
SOURCE_KEYS = ("best_miou", "best_threshold", "fg_fraction", "gt_fg_fraction", "threshold_at_edge")


@torch.inference_mode()
def evaluate_seeds(model: torch.nn.Module, dataset, cfg, *, device: torch.device | str = "cpu", context=None,
                   max_images: int = 0, scales=None, flip=None, cam_source: str | None = None) -> dict[str, Any]:
    """Seed mIoU of multi-scale CAMs and PACAMs over ``dataset`` with the background-threshold sweep.

    model: CAMNet (unwrapped, on ``device``); context: ``Context`` (the PACAM of a bank run; none
    needed with ``cpal.context = instance``); ``scales``/``flip``/``cam_source`` override
    ``cfg.inference``. Every map the model has is scored in the same pass: "cam", "pacam" (when
    there is a PACAM) and "pacam_argmax" (a PACAM with its own background channel,
    ``cpal.background = prototype``, scored by argmax without a threshold as SIPE scores its
    IS-CAM). Returns the chosen source's sweep results (``best_miou``, ``best_threshold``, curve,
    per-class IoU, ``fg_fraction`` / ``gt_fg_fraction``) plus ``sources`` ({name: ``SOURCE_KEYS``}
    of every map scored), ``images`` (scored), ``n_errors`` and ``errors`` (images left out: no
    ground-truth mask, unreadable) and ``cam_source``.
    """
    model.eval()
    source = cam_source or cfg.inference.cam_source
    own = cfg.cpal.own_prototypes
    if source == "pacam" and context is None and not own:
        raise ValueError("cam_source='pacam' needs context prototypes (a CPAL checkpoint after one clustering)")
    ctx = context.to(device) if (context is not None and not own) else None
    n_classes = cfg.data.num_classes + 1
    sweeps = {name: ThresholdSweep(n_classes, thresholds_from_config(cfg.inference))
              for name in ("cam", *(("pacam",) if ctx is not None or own else ()))}
    argmax = ConfusionMatrix(n_classes)
    errors: list[str] = []
    n_errors = scored = 0
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    for i in progress(range(n), "seed mIoU"):
        try:
            dataset.check_mask(i)
            item = dataset[i]
        except (OSError, ValueError) as e:  # DataError is a ValueError
            n_errors = _record(errors, n_errors, dataset.ids[i], e)
            continue
        res = multiscale_cams(model, item["image"].to(device), item["label"],
                              scales=tuple(scales or cfg.inference.scales),
                              flip=cfg.inference.flip if flip is None else flip,
                              context=ctx.prototypes if ctx else None, counts=ctx.counts if ctx else None,
                              cpal_cfg=cfg.cpal)
        gt = item["mask"].numpy()
        for name, sweep in sweeps.items():
            sweep.update(res[name], res["classes"], gt)
        if "pacam_bg" in res:
            argmax.update(own_background_label(res["pacam_bg"], res["pacam"], res["classes"]), gt)
        scored += 1
    results = {name: sweep.results() for name, sweep in sweeps.items()}
    out = dict(results[source])
    sources = {name: {k: r[k] for k in SOURCE_KEYS} for name, r in results.items()}
    if argmax.mat.sum():
        own_bg = argmax.compute()
        sources["pacam_argmax"] = {"best_miou": own_bg["miou"], "best_threshold": None, "threshold_at_edge": False,
                                   "fg_fraction": own_bg["fg_fraction"], "gt_fg_fraction": own_bg["gt_fg_fraction"]}
    out.update(sources=sources, images=scored, n_errors=n_errors, errors=errors, cam_source=source)
    return out


def evaluate_floors(dataset, max_images: int = 0) -> dict[str, Any]:
    """The no-model rows of every seed table, scored like seeds (one confusion matrix each):
    "fill_first_class" labels every pixel of an image with its first image-level class,
    "all_background" labels every pixel background. A map that scores near the fill covers
    rather than localises. Returns {name: {"miou", "fg_fraction"}, "gt_fg_fraction", "images"}.
    """
    n_classes = dataset.num_classes + 1
    mats = {"fill_first_class": ConfusionMatrix(n_classes), "all_background": ConfusionMatrix(n_classes)}
    scored = 0
    for i in range(len(dataset) if not max_images else min(max_images, len(dataset))):
        try:
            dataset.check_mask(i)
            _, mask, label = dataset.read(i)
        except (OSError, ValueError):
            continue
        mask = np.asarray(mask)
        classes = positive_classes(label)
        first = int(classes[0]) + 1 if len(classes) else 0
        mats["fill_first_class"].update(np.full(mask.shape, first, dtype=np.int64), mask)
        mats["all_background"].update(np.zeros(mask.shape, dtype=np.int64), mask)
        scored += 1
    res = {name: m.compute() for name, m in mats.items()}
    out: dict[str, Any] = {name: {"miou": r["miou"], "fg_fraction": r["fg_fraction"]} for name, r in res.items()}
    out.update(gt_fg_fraction=res["all_background"]["gt_fg_fraction"], images=scored)
    return out


def evaluate_cam_dir(cam_dir, dataset, cfg, max_images: int = 0, ids: list[str] | None = None) -> dict[str, Any]:
    """Seed mIoU of the CAM files in ``cam_dir`` over ``dataset`` (eval items, masks needed).

    cfg: a ``Config`` or an ``InferenceConfig`` (thresholds). Every file must hold the image's
    positive classes at the image's size. ids: score only these (say, those the folder's
    manifest lists: ``jobs.manifest_ids``; an id the split lacks is an error); None = the whole
    split; max_images: then only the first ones (0 = all). Returns ``ThresholdSweep.results()``
    plus ``images`` (scored), ``n_errors``, ``errors`` (first 100, each naming the id),
    ``class_names``, ``cam_dir``.
    """
    inference = getattr(cfg, "inference", cfg)
    sweep = ThresholdSweep(dataset.num_classes + 1, thresholds_from_config(inference))
    errors: list[str] = []
    n_errors = scored = 0
    index = {sid: i for i, sid in enumerate(dataset.ids)}
    wanted = list(dataset.ids) if ids is None else list(ids)
    for sid in progress(wanted[:max_images] if max_images else wanted, f"scoring {location(cam_dir).name}"):
        if sid not in index:
            n_errors = _record(errors, n_errors, sid, KeyError(f"not an id of this split ({len(index)} ids)"))
            continue
        i = index[sid]
        try:
            dataset.check_mask(i)
            _, mask, label = dataset.read(i)
            classes, cams = load_cams_npz(cam_path(cam_dir, sid), expected_classes=positive_classes(label))
            sweep.update(cams, classes, mask)
            scored += 1
        except (OSError, ValueError) as e:  # DataError and CamFileError are ValueErrors
            n_errors = _record(errors, n_errors, sid, e)
    out = sweep.results()
    out.update(images=scored, n_errors=n_errors, errors=errors, class_names=_names(dataset), cam_dir=str(cam_dir))
    return out


def evaluate_labels(label_dir, dataset, num_classes: int | None = None,
                    max_images: int = 0) -> dict[str, Any]:
    """mIoU of the label PNGs in ``label_dir`` against the masks of ``dataset``.

    num_classes: classes including background (default ``dataset.num_classes + 1``);
    max_images: only the first ones (0 = all).
    Returns ``miou``, ``iou`` (list, NaN = absent), ``present``, ``pixel_acc``, ``pixels``
    (counted), ``images`` (scored), ``frac_ignored`` (pixels labelled 255 / all pixels of the
    scored labels), ``frac_ignored_on_gt`` (the same over pixels with a valid gt), ``n_errors``,
    ``errors``, ``class_names``, ``label_dir``.
    """
    cm = ConfusionMatrix(num_classes or dataset.num_classes + 1, ignore_index=IGNORE)
    errors: list[str] = []
    n_errors = scored = 0
    ignored = total = ignored_gt = total_gt = 0
    for i in progress(range(len(dataset) if not max_images else min(max_images, len(dataset))),
                      f"scoring {location(label_dir).name}"):
        sid = dataset.ids[i]
        try:
            dataset.check_mask(i)
            mask = np.asarray(dataset.read(i)[1])
            pred = load_label_png(location(label_dir) / f"{sid}.png", expected_shape=mask.shape)
            cm.update(pred, mask, ignore_pred=True)
        except (OSError, ValueError) as e:
            n_errors = _record(errors, n_errors, sid, e)
            continue
        scored += 1
        ignored += int((pred == IGNORE).sum())
        total += pred.size
        valid = mask != IGNORE
        ignored_gt += int((pred[valid] == IGNORE).sum())
        total_gt += int(valid.sum())
    res = cm.compute()
    return {
        "miou": res["miou"], "iou": res["iou"].tolist(), "present": res["present"].tolist(),
        "pixel_acc": res["pixel_acc"], "pixels": res["pixels"], "images": scored,
        "frac_ignored": ignored / total if total else float("nan"),
        "frac_ignored_on_gt": ignored_gt / total_gt if total_gt else float("nan"),
        "n_errors": n_errors, "errors": errors, "class_names": _names(dataset)[:cm.num_classes],
        "label_dir": str(label_dir),
    }


def write_json(result: dict[str, Any], path) -> Location:
    """Save a result dict as indented strict JSON (NaN -> null), atomically."""
    return atomic_write_bytes(path, strict_json(result, indent=2).encode())


def write_label_report(result: dict[str, Any], out_dir, title: str = "Label mIoU") -> dict[str, Location]:
    """Save an ``evaluate_labels`` result as ``miou.json`` and ``miou.md`` (mIoU, pixel accuracy,
    ignored share, per-class IoU table) in ``out_dir``; returns {"json", "md"} -> paths."""
    out = location(out_dir)
    paths = {"json": out / "miou.json", "md": out / "miou.md"}
    write_json(result, paths["json"])
    lines = [f"# {title}", "", f"- mIoU: **{pct(result['miou'], 2)}** over {result['images']} images "
             f"({result['n_errors']} left out)", f"- pixel accuracy: {pct(result['pixel_acc'], 2)}",
             f"- pixels labelled 255 (ignored): {pct(result['frac_ignored'], 2)}", "",
             *markdown_table(["class", "IoU (%)"], [[n, pct(v, 2)] for n, v in zip(result["class_names"], result["iou"])],
                             "lr")]
    atomic_write_bytes(paths["md"], ("\n".join(lines) + "\n").encode())
    return paths
