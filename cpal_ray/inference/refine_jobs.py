"""Per-image jobs of the refine stages (no Ray): pseudo masks by random walk, segmenter predictions.

Like ``cpal_ray.inference.jobs`` (whose rows, manifests and validation they share): one image in,
one PNG written atomically, one ``LABEL_SCHEMA`` row out; a bad input gives a ``failed`` row
naming the id, never an exception; with ``skip_existing`` a PNG that validates is kept, so a
resumed run redoes only what is missing and ends with the same bytes (the jobs are deterministic).
"""
from __future__ import annotations

import numpy as np

from cpal_ray.inference.jobs import label_job, load_image_cams, read_rgb


def mask_job(edge_net, dataset, index: int, cam_dir, out_dir, affinity_cfg, skip_existing: bool = True) -> dict:
    """IRN pseudo mask of item ``index``: ``<cam_dir>/<id>.npz`` walked over the boundary map of
    ``edge_net`` -> ``<out_dir>/<id>.png`` (class ids 0..N). Returns a LABEL_SCHEMA row (``label_job``)."""
    from cpal_ray.refine.masks import boundary_map, walk_label

    def make_label(classes, hw):
        cam_classes, cams = load_image_cams(cam_dir, dataset.ids[index], classes, hw)
        boundary = boundary_map(edge_net, dataset[index]["image"], flip=affinity_cfg.flip)
        return walk_label(cams, cam_classes, boundary, affinity_cfg)

    return label_job(dataset, index, out_dir, make_label, skip_existing=skip_existing)


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
    ids 0..N, any class: no image-level label is used). Returns a LABEL_SCHEMA row (``label_job``)
    whose ``classes`` are the foreground classes predicted."""
    def make_label(classes, hw):
        rgb = read_rgb(dataset, index) if seg_cfg.crf else None
        return seg_label(seg_net, dataset[index]["image"], rgb, seg_cfg, pseudo_cfg)

    return label_job(dataset, index, out_dir, make_label, image_labels=False, skip_existing=skip_existing)
