"""The per-image jobs of the Ray Data stages: CAM files, CRF pseudo-labels, pseudo masks by random
walk, segmenter predictions. No Ray.

Each job takes one dataset index, writes one output file atomically and returns one manifest
row (``cpal_ray.inference.manifest``): a small dict, never an array. A job never raises for a bad
input: a missing or corrupt image, a corrupt CAM file or CAMs of the wrong classes give a row with
``status="failed"`` and an ``error`` that starts with the id. The stages of
``cpal_ray.distributed.stages`` map these jobs over a dataset; tests and small runs call them directly.

Resuming: with ``skip_existing`` a job first validates the output it would write. A valid one
(decodes, right size, only allowed values, complete file) gives ``status="skipped"``; anything
else is redone. Outputs are deterministic, so a resumed run ends with the same bytes.
"""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from cpal_ray.data.classes import positive_classes
from cpal_ray.inference.io import LabelFileError, cam_path, encode_label_png, load_cams_npz, load_label_png, \
    save_cams_npz
from cpal_ray.inference.crf import crf_refine_labels
from cpal_ray.inference.manifest import CAM_SCHEMA, LABEL_SCHEMA, failed_row, manifest_row, recorded_sha256
from cpal_ray.inference.multiscale import multiscale_cams
from cpal_ray.inference.pseudo import IGNORE, pseudo_label_from_config
from cpal_ray.refine.masks import boundary_map, segment, walk_label
from cpal_ray.storage import Location, location

log = logging.getLogger(__name__)
PNG_END = b"IEND\xaeB`\x82"


def validate_label_png(path, hw: tuple[int, int], classes: np.ndarray) -> tuple[np.ndarray, str]:
    """Check a finished pseudo-label: a complete PNG (signature .. IEND), decodes, shape ``hw``,
    values in {0, classes + 1, 255}. Returns (label (H, W) uint8, sha256 of the bytes);
    raises ``LabelFileError`` naming the path otherwise (missing, truncated, wrong size/values)."""
    path = location(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LabelFileError(f"{path}: cannot read ({e})") from e
    if not (data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(PNG_END)):
        raise LabelFileError(f"{path}: incomplete PNG ({len(data)} bytes)")
    label = load_label_png(path, expected_shape=tuple(hw))
    allowed = np.concatenate([[0, IGNORE], np.asarray(classes, dtype=np.int64) + 1])
    bad = np.setdiff1d(np.unique(label), allowed)
    if bad.size:
        raise LabelFileError(f"{path}: values {bad.tolist()} outside {sorted(allowed.tolist())}")
    return label, hashlib.sha256(data).hexdigest()


def existing_label(png, hw: tuple[int, int], classes, recorded: str | None = None
                   ) -> tuple[np.ndarray | None, str | None]:
    """(label, sha256) of a finished PNG that ``validate_label_png`` accepts and whose sha256 is
    ``recorded`` (the manifest's, when it has one), else (None, None): the file is missing or is
    redone (logged with the reason)."""
    if not png.exists():
        return None, None
    try:
        label, sha = validate_label_png(png, hw, classes)
    except LabelFileError as e:
        log.info("redoing %s: %s", png, e)
        return None, None
    if recorded and sha != recorded:
        log.info("redoing %s: its sha256 is not the one its manifest row records", png)
        return None, None
    return label, sha



def write_label_png(png, label: np.ndarray) -> str:
    """Write ``label`` as a palette PNG (atomically); returns the sha256 of its bytes."""
    data = encode_label_png(label)
    png.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_image_cams(cam_dir, sample_id: str, classes: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(classes, cams) of ``<cam_dir>/<id>.npz``, which must hold exactly ``classes`` at size ``hw``
    (ValueError naming the file otherwise)."""
    cam_file = cam_path(cam_dir, sample_id)
    cam_classes, cams = load_cams_npz(cam_file, expected_classes=classes)
    if cams.shape[1:] != tuple(hw):
        raise ValueError(f"{cam_file}: CAM size {cams.shape[1:]} != image size {tuple(hw)}")
    return cam_classes, cams


def cams_valid(paths: list[Location], classes: np.ndarray, hw: tuple[int, int]) -> bool:
    """True when every file loads with exactly ``classes`` and CAMs of size ``hw``."""
    try:
        return all(load_cams_npz(p, expected_classes=classes)[1].shape[1:] == tuple(hw) for p in paths)
    except (OSError, ValueError):
        return False



# ---------------------------------------------------------------------------------- the jobs


def cam_job(model, dataset, index: int, out_dir, *, sources=("cam",), scales=(1.0,), flip: bool = True,
            save_dtype: str = "float16", context=None, cpal_cfg=None, skip_existing: bool = True,
            label_dir=None) -> dict:
    """Multi-scale CAMs of item ``index`` -> ``cam_path(out_dir, id, source)`` per source; a CAM_SCHEMA row.

    sources: subset of ("cam", "pacam"); "pacam" needs ``context`` (engine ``Context``, on the
    model's device) and ``cpal_cfg``. label_dir: skip when ``<label_dir>/<id>.png`` is already
    a valid pseudo-label (the on-the-fly pseudo-label run).
    """
    t0 = time.perf_counter()
    sid = dataset.ids[index]
    paths = [cam_path(out_dir, sid, s) for s in sources]
    named = {s: str(p) for s, p in zip(sources, paths)}
    try:
        classes = positive_classes(dataset.label_of(index))
        hw = dataset.image_size(index)
        done = dict(classes=classes.tolist(), height=hw[0], width=hw[1],
                    path=named.get("cam", ""), pacam_path=named.get("pacam", ""))
        if skip_existing and label_dir is not None:
            try:
                validate_label_png(location(label_dir) / f"{sid}.png", hw, classes)
                return manifest_row(CAM_SCHEMA, sid, status="skipped", seconds=time.perf_counter() - t0, **done)
            except LabelFileError:
                pass
        if skip_existing and cams_valid(paths, classes, hw):
            return manifest_row(CAM_SCHEMA, sid, status="skipped", seconds=time.perf_counter() - t0, **done)
        item = dataset[index]
        res = multiscale_cams(model, item["image"], item["label"], scales=tuple(scales), flip=flip,
                              context=context.prototypes if context is not None else None,
                              counts=context.counts if context is not None else None, cpal_cfg=cpal_cfg)
        for source, path in zip(sources, paths):
            save_cams_npz(path, res["classes"], res[source], dtype=save_dtype)
        return manifest_row(CAM_SCHEMA, sid, status="done", seconds=time.perf_counter() - t0, **done)
    except Exception as e:  # one bad image must not stop the run: reported in the row
        return failed_row(CAM_SCHEMA, sid, e, t0)


def label_job(dataset, index: int, out_dir, make_label, *, image_labels: bool = True,
              skip_existing: bool = True) -> dict:
    """What every job writing one label PNG per image does: ``<out_dir>/<id>.png`` is kept when it
    already validates (size, classes), else ``make_label(classes, hw)`` -> (H, W) uint8 is written
    atomically. Returns a LABEL_SCHEMA row (``skipped`` / ``done``; any exception: ``failed``,
    naming the id).

    image_labels: the PNG may hold only the image's positive classes, which the row lists; without
    (predictions of a segmenter) any class, and the row lists the foreground classes it holds.
    """
    t0 = time.perf_counter()
    sid = dataset.ids[index]
    png = location(out_dir) / f"{sid}.png"
    try:
        classes = positive_classes(dataset.label_of(index)) if image_labels else np.arange(dataset.num_classes)
        hw = dataset.image_size(index)
        label, sha = existing_label(png, hw, classes, recorded_sha256(out_dir).get(sid)) if skip_existing \
            else (None, None)
        status = "skipped"
        if label is None:
            status, label = "done", make_label(classes, hw)
            sha = write_label_png(png, label)
        listed = classes.tolist() if image_labels else [int(c) - 1 for c in np.unique(label) if 0 < c < IGNORE]
        return manifest_row(LABEL_SCHEMA, sid, status=status, path=str(png), classes=listed, height=hw[0],
                            width=hw[1], frac_ignored=float(np.mean(label == IGNORE)), sha256=sha,
                            seconds=time.perf_counter() - t0)
    except Exception as e:  # one bad image must not stop the run: reported in the row
        return failed_row(LABEL_SCHEMA, sid, e, t0)


def pseudo_label_job(dataset, index: int, cam_dir, out_dir, pseudo_cfg, skip_existing: bool = True) -> dict:
    """IRN / crf_argmax pseudo-label of item ``index`` from ``<cam_dir>/<id>.npz`` -> ``<out_dir>/<id>.png``.

    The CAM file must hold exactly the image's positive classes at the image's size. Returns a
    LABEL_SCHEMA row (``label_job``): classes, size, fraction of 255 pixels, sha256 of the PNG bytes.
    """
    def make_label(classes, hw):
        cam_classes, cams = load_image_cams(cam_dir, dataset.ids[index], classes, hw)
        return pseudo_label_from_config(dataset.read_image(index), cams, cam_classes, pseudo_cfg)

    return label_job(dataset, index, out_dir, make_label, skip_existing=skip_existing)


def mask_job(edge_net, dataset, index: int, cam_dir, out_dir, affinity_cfg, skip_existing: bool = True) -> dict:
    """IRN pseudo mask of item ``index``: ``<cam_dir>/<id>.npz`` walked over the boundary map of
    ``edge_net`` -> ``<out_dir>/<id>.png`` (class ids 0..N). Returns a LABEL_SCHEMA row (``label_job``)."""
    def make_label(classes, hw):
        cam_classes, cams = load_image_cams(cam_dir, dataset.ids[index], classes, hw)
        boundary = boundary_map(edge_net, dataset[index]["image"], flip=affinity_cfg.flip)
        return walk_label(cams, cam_classes, boundary, affinity_cfg)

    return label_job(dataset, index, out_dir, make_label, skip_existing=skip_existing)


def seg_label(seg_net, image, rgb: np.ndarray, seg_cfg, pseudo_cfg) -> np.ndarray:
    """The segmenter's label map (H, W) uint8 of one image: argmax of ``segment``'s probabilities;
    with ``seg.crf``, refined by the DenseCRF of ``pseudo.*`` over the classes it predicted."""
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
        rgb = dataset.read_image(index) if seg_cfg.crf else None
        return seg_label(seg_net, dataset[index]["image"], rgb, seg_cfg, pseudo_cfg)

    return label_job(dataset, index, out_dir, make_label, image_labels=False, skip_existing=skip_existing)
