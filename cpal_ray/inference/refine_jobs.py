"""Per-image jobs of the refine stages (no Ray): pseudo masks by random walk, segmenter predictions.

Like ``cpal_ray.inference.jobs`` (whose rows, manifests and validation they share): one image in,
one PNG written atomically, one ``LABEL_SCHEMA`` row out; a bad input gives a ``failed`` row
naming the id, never an exception; with ``skip_existing`` a PNG that validates is kept, so a
resumed run redoes only what is missing and ends with the same bytes (the jobs are deterministic).
"""
from __future__ import annotations

import time

import numpy as np

from cpal_ray.data.classes import positive_classes
from cpal_ray.inference.jobs import (LABEL_SCHEMA, existing_label, failed_row, image_hw, load_image_cams,
                                     manifest_row, read_rgb, write_label_png)
from cpal_ray.storage import location

def mask_job(edge_net, dataset, index: int, cam_dir, out_dir, affinity_cfg, skip_existing: bool = True) -> dict:
    """IRN pseudo mask of item ``index``: ``<cam_dir>/<id>.npz`` walked over the boundary map of
    ``edge_net`` -> ``<out_dir>/<id>.png`` (class ids 0..N). Returns a LABEL_SCHEMA row."""
    from cpal_ray.refine.masks import boundary_map, walk_label

    t0 = time.perf_counter()
    sid = dataset.ids[index]
    png = location(out_dir) / f"{sid}.png"
    try:
        classes = positive_classes(dataset.label_of(index))
        hw = image_hw(dataset, index)
        label, sha = existing_label(png, hw, classes) if skip_existing else (None, None)
        status = "skipped"
        if label is None:
            status = "done"
            cam_classes, cams = load_image_cams(cam_dir, sid, classes, hw)
            boundary = boundary_map(edge_net, dataset[index]["image"], flip=affinity_cfg.flip)
            label = walk_label(cams, cam_classes, boundary, affinity_cfg)
            sha = write_label_png(png, label)
        return manifest_row(LABEL_SCHEMA, sid, status=status, path=str(png), classes=classes.tolist(), height=hw[0],
                    width=hw[1], frac_ignored=0.0, sha256=sha, seconds=time.perf_counter() - t0)
    except Exception as e:  # one bad image must not stop the run: reported in the row
        return failed_row(LABEL_SCHEMA, sid, e, t0)


def seg_label(seg_net, image, rgb: np.ndarray, seg_cfg, pseudo_cfg) -> np.ndarray:
    """The segmenter's label map (H, W) uint8 of one image: argmax of ``segment``'s probabilities;
    with ``seg.crf``, refined by the DenseCRF of ``pseudo.*`` over the classes it predicted."""
    from cpal_ray.inference.crf import crf_refine_labels
    from cpal_ray.refine.masks import segment

    pred = segment(seg_net, image, tuple(seg_cfg.scales), seg_cfg.flip).argmax(dim=0).numpy()
    if seg_cfg.crf:
        present = np.unique(pred)
        refined = crf_refine_labels(rgb, np.searchsorted(present, pred), len(present), pseudo_cfg)
        pred = present[refined]
    return pred.astype(np.uint8)


def seg_job(seg_net, dataset, index: int, out_dir, seg_cfg, pseudo_cfg, skip_existing: bool = True) -> dict:
    """The segmenter's prediction of item ``index`` -> ``<out_dir>/<id>.png`` (VOC palette, class
    ids 0..N, any class: no image-level label is used). Returns a LABEL_SCHEMA row whose
    ``classes`` are the foreground classes predicted."""
    t0 = time.perf_counter()
    sid = dataset.ids[index]
    png = location(out_dir) / f"{sid}.png"
    try:
        hw = image_hw(dataset, index)
        every = np.arange(dataset.num_classes)
        label, sha = existing_label(png, hw, every) if skip_existing else (None, None)
        status = "skipped"
        if label is None:
            status = "done"
            label = seg_label(seg_net, dataset[index]["image"], read_rgb(dataset, index) if seg_cfg.crf else None,
                              seg_cfg, pseudo_cfg)
            sha = write_label_png(png, label)
        predicted = [int(c) - 1 for c in np.unique(label) if 0 < c < 255]
        return manifest_row(LABEL_SCHEMA, sid, status=status, path=str(png), classes=predicted, height=hw[0], width=hw[1],
                    frac_ignored=0.0, sha256=sha, seconds=time.perf_counter() - t0)
    except Exception as e:  # one bad image must not stop the run: reported in the row
        return failed_row(LABEL_SCHEMA, sid, e, t0)
