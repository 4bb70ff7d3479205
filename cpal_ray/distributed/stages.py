"""The four Ray Data stages of the WSSS pipeline, each one ``StageSpec`` for ``run_stage``.

    ids ─► CamPredictor  (``inference`` resources)  ─► <cams>/<id>.npz, pacam/<id>.npz   run_make_cams
    │  └─► PseudoLabeler (``pseudo`` resources)     ─► <out>/<id>.png  (CRF seeds)       run_pseudo_labels
    ├──► MaskMaker       (``affinity`` resources)   ─► <out>/<id>.png  (0..N)            run_make_masks
    └──► SegPredictor    (``seg`` resources)        ─► <out>/<id>.png  (0..N)            run_seg_predict

Each actor loads its model once and maps one per-image job (``cpal_ray.inference.image_jobs``);
every section gives its actors' resources in one shape (``actor_cpus``, ``actor_gpus``,
``max_actors``: ``stage_runner.ActorResources``). Pseudo-labels read saved CAMs (``cam_dir``) or,
given a checkpoint, chain the CAM and CRF steps and keep the CAMs in ``<out>/cams``.

Checked first, written after: the inputs are checked without Ray (``stage_inputs``) before
``run_spec.json``, ``config.yaml`` or any output is written. Resuming: every job first validates
the file it would write and skips it when valid, so a killed run started again redoes only what
is missing or broken and ends with the bytes of an uninterrupted run. A bad image or CAM file
gives a ``failed`` row naming the id; the rest of the run goes on (``RunSummary``).
"""
from __future__ import annotations

import dataclasses

from cpal_ray.config import Config
from cpal_ray.data import DataError, ImageFolderDataset, class_names
from cpal_ray.distributed.stage_inputs import (SOURCES, StageInputs, check_image_folder, check_inputs,
                                               check_stage_checkpoint, make_cams_spec, make_masks_spec,
                                               pseudo_labels_spec, seg_predict_spec)
from cpal_ray.distributed.stage_runner import ActorResources, ImageStage, RunSummary, StageSpec, StageStep, run_stage
from cpal_ray.engine.checkpoint import CheckpointError
from cpal_ray.engine.tasks import load_trained
from cpal_ray.inference.image_jobs import cam_job, mask_job, pseudo_label_job, seg_job
from cpal_ray.inference.io import source_dir
from cpal_ray.inference.manifest import CAM_SCHEMA, LABEL_SCHEMA, failed_row
from cpal_ray.storage import location


def _load_task_model(checkpoint: str, task: str, device):
    model, cfg, _ = load_trained(checkpoint)
    if cfg.train.task != task:
        raise CheckpointError(f"{checkpoint}: a {cfg.train.task!r} checkpoint, this stage needs a {task!r} one")
    return model.to(device)


class CamPredictor(ImageStage):
    """Multi-scale (+flip) CAM files for a batch of ids.

    Args:
        checkpoint_dir: checkpoint or ``final/`` folder, loaded once per actor (``load_trained``).
        cfg: the run's Config: ``data`` picks the images, ``inference`` the scales, flip and
            dtype; ``model`` must match the checkpoint.
        out_dir: CAM folder: ``<out>/<id>.npz`` (CAM) and ``<out>/pacam/<id>.npz`` (PACAM).
        split: dataset split ("val", "train" or a list name).
        source: "cam", "pacam" or "both" (PACAM needs the checkpoint's context prototypes).
        skip_existing: keep files that already validate (resume).
        label_dir: also skip ids whose pseudo-label PNG there is already valid.
        crash_after: test knob: raise after this many images in one actor (-1 = never).
    """
    schema = CAM_SCHEMA

    def __init__(self, checkpoint_dir: str, cfg: Config, out_dir: str, split: str = "val", source: str = "cam",
                 skip_existing: bool = True, label_dir: str | None = None, crash_after: int = -1):
        super().__init__(cfg, split, crash_after)
        self.model, self.cfg, context = load_trained(checkpoint_dir, cfg=cfg)
        self.model.to(self.device)
        self.sources = SOURCES[source]
        if "pacam" in self.sources and context is None and not self.cfg.cpal.own_prototypes:
            raise ValueError(f"{checkpoint_dir}: no context prototypes in this checkpoint; PACAM needs them")
        self.context = context.to(self.device) if "pacam" in self.sources and context is not None else None
        self.out_dir, self.skip_existing, self.label_dir = out_dir, skip_existing, label_dir

    def job(self, index: int) -> dict:
        inf = self.cfg.inference
        return cam_job(self.model, self.dataset, index, self.out_dir, sources=self.sources, scales=inf.scales,
                       flip=inf.flip, save_dtype=inf.save_dtype, context=self.context, cpal_cfg=self.cfg.cpal,
                       skip_existing=self.skip_existing, label_dir=self.label_dir)


class PseudoLabeler(ImageStage):
    """CRF pseudo-label PNGs (``pseudo.mode`` irn / crf_argmax) for a batch of ids.

    Args: cfg (``data`` and ``pseudo``), out_dir (``<out>/<id>.png``), cam_dir (the ``<id>.npz``
    CAM files), split, skip_existing, crash_after (as ``CamPredictor``). Chained after
    ``CamPredictor``, a failed CAM row stays failed.
    """
    schema = LABEL_SCHEMA

    def __init__(self, cfg: Config, out_dir: str, cam_dir: str, split: str = "train", skip_existing: bool = True,
                 crash_after: int = -1):
        super().__init__(cfg, split, crash_after)
        self.cfg, self.out_dir, self.cam_dir, self.skip_existing = cfg, out_dir, cam_dir, skip_existing

    def row(self, sid: str, batch_row: dict) -> dict:
        if batch_row.get("status") == "failed":
            return failed_row(LABEL_SCHEMA, sid, f"CAM stage: {batch_row.get('error', '').removeprefix(f'id {sid}: ')}")
        return super().row(sid, batch_row)

    def job(self, index: int) -> dict:
        return pseudo_label_job(self.dataset, index, self.cam_dir, self.out_dir, self.cfg.pseudo, self.skip_existing)


class MaskMaker(ImageStage):
    """``mask_job`` for a batch of ids (the boundary network loaded once per actor).

    Args: checkpoint (an affinity run's ``final/``), cfg (``data`` and ``affinity``), out_dir,
    cam_dir (``<id>.npz`` CAM files), split, skip_existing, crash_after (as ``PseudoLabeler``).
    """
    schema = LABEL_SCHEMA

    def __init__(self, checkpoint: str, cfg: Config, out_dir: str, cam_dir: str, split: str = "train",
                 skip_existing: bool = True, crash_after: int = -1):
        super().__init__(cfg, split, crash_after)
        self.model = _load_task_model(checkpoint, "affinity", self.device)
        self.cfg, self.out_dir, self.cam_dir, self.skip_existing = cfg, out_dir, cam_dir, skip_existing

    def job(self, index: int) -> dict:
        return mask_job(self.model, self.dataset, index, self.cam_dir, self.out_dir, self.cfg.affinity,
                        self.skip_existing)


class SegPredictor(ImageStage):
    """``seg_job`` for a batch of ids of ``split``, or of the image files of ``images_dir`` (the
    user's own photos) when given."""
    schema = LABEL_SCHEMA

    def __init__(self, checkpoint: str, cfg: Config, out_dir: str, split: str = "val", images_dir: str | None = None,
                 skip_existing: bool = True, crash_after: int = -1):
        photos = ImageFolderDataset(images_dir, cfg.data.num_classes, class_names(cfg.data)) if images_dir else None
        super().__init__(cfg, split, crash_after, dataset=photos)
        self.model = _load_task_model(checkpoint, "seg", self.device)
        self.cfg, self.out_dir, self.skip_existing = cfg, out_dir, skip_existing

    def job(self, index: int) -> dict:
        return seg_job(self.model, self.dataset, index, self.out_dir, self.cfg.seg, self.cfg.pseudo, self.skip_existing)


# ------------------------------------------------------------------------------------ driver


def _cam_step(cfg: Config, checkpoint, out_dir, split: str, source: str, skip_existing: bool, label_dir,
              crash_after: int) -> StageStep:
    kwargs = dict(checkpoint_dir=str(checkpoint), cfg=cfg, out_dir=str(out_dir), split=split, source=source,
                  skip_existing=skip_existing, label_dir=str(label_dir) if label_dir else None,
                  crash_after=crash_after)
    return StageStep(CamPredictor, kwargs, ActorResources.of(cfg.inference))


def run_make_cams(cfg: Config, checkpoint, out_dir, *, split: str = "val", source: str = "cam",
                  skip_existing: bool = True, overwrite: bool = False, limit: int = 0, rows_per_block: int = 4,
                  crash_after: int = -1, inputs: StageInputs | None = None) -> RunSummary:
    """CAM files for every image of ``split``: ``<out>/<id>.npz`` and/or ``<out>/pacam/<id>.npz``,
    ``<out>/manifest.parquet``, ``<out>/config.yaml`` (the resolved config) and ``run_spec.json``.

    cfg: data, inference settings and the CAM actors' resources (``inference.actor_cpus``,
    ``actor_gpus``, ``max_actors``; ``model`` must match the checkpoint); checkpoint, out_dir:
    local paths or URIs; source: "cam", "pacam", "both"; overwrite: recompute everything, even
    files made with other settings; limit: only the first ``limit`` ids (0 = all); inputs: what
    ``check_inputs`` returned for these arguments (checked here when not given; nothing is written
    when the check fails).
    """
    out_dir = location(out_dir)
    inputs = inputs or check_inputs(cfg, split, checkpoint=checkpoint, source=source, limit=limit)
    step = _cam_step(inputs.worker_cfg, checkpoint, out_dir, split, source, skip_existing and not overwrite, None,
                     crash_after)
    return run_stage(StageSpec("make_cams", out_dir, inputs, CAM_SCHEMA, make_cams_spec(inputs, split, checkpoint),
                               [step], overwrite, rows_per_block))


def run_pseudo_labels(cfg: Config, out_dir, *, cam_dir=None, checkpoint=None, split: str = "train",
                      skip_existing: bool = True, overwrite: bool = False, limit: int = 0, rows_per_block: int = 4,
                      crash_after: int = -1, inputs: StageInputs | None = None) -> RunSummary:
    """Pseudo-label PNGs ``<out>/<id>.png`` for every image of ``split`` + ``<out>/manifest.parquet``.

    CAMs come from ``cam_dir`` (files of ``run_make_cams``) or, without it, are computed from
    ``checkpoint`` (``cfg.inference.cam_source``, CAM actors as in ``run_make_cams``) into
    ``<out>/cams``. cfg.pseudo: mode, preset, CRF parameters and the CRF actors' resources. A
    folder made with other settings is refused unless ``overwrite`` (which also redoes every
    file). Other arguments as ``run_make_cams``.
    """
    out_dir = location(out_dir)
    if cam_dir is None and checkpoint is None:
        raise ValueError("pseudo-labels need saved CAMs (cam_dir) or a checkpoint to compute them")
    on_the_fly = cam_dir is None
    inputs = inputs or check_inputs(cfg, split, checkpoint=checkpoint if on_the_fly else None, cam_dir=cam_dir,
                                    source=cfg.inference.cam_source, limit=limit)
    spec = pseudo_labels_spec(inputs, split, cam_dir=cam_dir, checkpoint=checkpoint)
    worker, skip_existing, steps = inputs.worker_cfg, skip_existing and not overwrite, []
    if on_the_fly:
        source, cam_root = worker.inference.cam_source, out_dir / "cams"
        cam_dir = source_dir(cam_root, source)
        steps.append(_cam_step(worker, checkpoint, cam_root, split, source, skip_existing, out_dir, -1))
    kwargs = dict(cfg=worker, out_dir=str(out_dir), cam_dir=str(cam_dir), split=split, skip_existing=skip_existing,
                  crash_after=crash_after)
    steps.append(StageStep(PseudoLabeler, kwargs, ActorResources.of(worker.pseudo)))
    return run_stage(StageSpec("pseudo_labels", out_dir, inputs, LABEL_SCHEMA, spec, steps, overwrite, rows_per_block))


def run_make_masks(cfg: Config, checkpoint, out_dir, *, cam_dir, split: str = "train", skip_existing: bool = True,
                   overwrite: bool = False, limit: int = 0, rows_per_block: int = 4, crash_after: int = -1,
                   inputs: StageInputs | None = None) -> RunSummary:
    """Pseudo masks ``<out>/<id>.png`` of every image of ``split``: the CAM files of ``cam_dir``
    walked over the affinities of the boundary network ``checkpoint`` (``cfg.affinity``: walk
    settings and actor resources), with ``<out>/manifest.parquet``, ``config.yaml``, ``run_spec.json``."""
    out_dir = location(out_dir)
    check_stage_checkpoint(checkpoint, "affinity")
    inputs = inputs or check_inputs(cfg, split, cam_dir=cam_dir, limit=limit)
    kwargs = dict(checkpoint=str(checkpoint), cfg=inputs.worker_cfg, out_dir=str(out_dir), cam_dir=str(cam_dir),
                  split=split, skip_existing=skip_existing and not overwrite, crash_after=crash_after)
    step = StageStep(MaskMaker, kwargs, ActorResources.of(inputs.cfg.affinity))
    return run_stage(StageSpec("make_masks", out_dir, inputs, LABEL_SCHEMA,
                               make_masks_spec(inputs, split, checkpoint, cam_dir), [step], overwrite, rows_per_block))


def run_seg_predict(cfg: Config, checkpoint, out_dir, *, split: str = "val", images_dir=None,
                    skip_existing: bool = True, overwrite: bool = False, limit: int = 0, rows_per_block: int = 4,
                    crash_after: int = -1, inputs: StageInputs | None = None) -> RunSummary:
    """The segmenter's predictions ``<out>/<id>.png`` for ``split`` (or the photos of ``images_dir``)
    with ``cfg.seg`` (scales, flip, crf, actor resources), and the manifest, config and run spec."""
    out_dir = location(out_dir)
    check_stage_checkpoint(checkpoint, "seg")
    if images_dir is not None:
        inputs = inputs or check_image_folder(cfg, images_dir)
        if limit:
            inputs = dataclasses.replace(inputs, ids=inputs.ids[:limit])
    else:
        inputs = inputs or check_inputs(cfg, split, limit=limit)
    if not inputs.ids and not inputs.rejected:
        raise DataError(f"{images_dir or split}: no images to predict")
    kwargs = dict(checkpoint=str(checkpoint), cfg=inputs.worker_cfg, out_dir=str(out_dir), split=split,
                  images_dir=str(images_dir) if images_dir is not None else None,
                  skip_existing=skip_existing and not overwrite, crash_after=crash_after)
    step = StageStep(SegPredictor, kwargs, ActorResources.of(inputs.cfg.seg))
    return run_stage(StageSpec("seg_predict", out_dir, inputs, LABEL_SCHEMA,
                               seg_predict_spec(inputs, split, checkpoint, images_dir), [step], overwrite,
                               rows_per_block))
