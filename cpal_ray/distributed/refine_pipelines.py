"""Ray Data stages of the refine half: pseudo masks by random walk, and segmenter predictions.

    ids ─► MaskMaker     (boundary network loaded once per actor; ``affinity.cpus_per_task`` CPUs,
    │                     elastic pool up to ``affinity.max_actors``)   ─► <out>/<id>.png (0..N)
    └──► SegPredictor    (segmenter loaded once per actor; ``seg.cpus_per_task`` CPUs, up to
                          ``seg.max_actors``)                          ─► <out>/<id>.png (0..N)
    GPUs: with ``inference.use_gpu`` each actor also takes the CAM actors' share of a GPU.
    rows ─► driver: manifest parts ─► <out>/manifest.parquet

The same contract as the CAM and CRF stages (``cpal_ray.distributed.pipelines``, whose driver
helpers these reuse): inputs checked before Ray and before anything is written, the settings that
decide the bytes saved in ``run_spec.json`` (another folder's settings are refused unless
``overwrite``), per-image jobs that skip a valid PNG (a killed run started again redoes only what
is missing and ends with the same bytes), a failed row naming the id for a bad image.
"""
from __future__ import annotations

import dataclasses
import time

import pyarrow as pa

from cpal_ray.config import Config, save_config
from cpal_ray.data import DataError, ImageFolderDataset, class_names
from cpal_ray.distributed.pipelines import (MANIFEST_DIR, PipelineInputs, RunSummary, _column, _drain, _finish,
                                            _id_dataset, _spec, _Stage, check_inputs, elastic_pool)
from cpal_ray.distributed.runtime import actor_device
from cpal_ray.engine.checkpoint import CheckpointError, load_checkpoint
from cpal_ray.inference.jobs import LABEL_SCHEMA, ManifestWriter, check_run_spec, failed_row, rows_to_table
from cpal_ray.inference.refine_jobs import mask_job, seg_job
from cpal_ray.storage import location


def _load(checkpoint: str, task: str, device):
    from cpal_ray.engine.tasks import load_trained

    model, cfg, _ = load_trained(checkpoint)
    if cfg.train.task != task:
        raise CheckpointError(f"{checkpoint}: a {cfg.train.task!r} checkpoint, this stage needs a {task!r} one")
    return model.to(device)


def check_stage_checkpoint(checkpoint, task: str) -> Config:
    """Load and verify a refine checkpoint without Ray; CheckpointError when it is not a ``task``
    checkpoint. Returns its saved config."""
    cfg = load_checkpoint(checkpoint)["config"]
    if cfg.train.task != task:
        raise CheckpointError(f"{checkpoint}: a {cfg.train.task!r} checkpoint (train.task), not {task!r}")
    return cfg


class _PerImage(_Stage):
    """A stage mapping ``self.job(index) -> LABEL_SCHEMA row`` over a batch of ids."""

    def job(self, index: int) -> dict:
        raise NotImplementedError

    def __call__(self, batch) -> pa.Table:
        rows = []
        for sid in map(str, _column(batch, "id")):
            self._tick()
            rows.append(self.job(self.index[sid]) if sid in self.index else
                        failed_row(LABEL_SCHEMA, sid, "not in the dataset read by this worker"))
        return rows_to_table(rows, LABEL_SCHEMA)


class MaskMaker(_PerImage):
    """Ray Data stage: ``mask_job`` for a batch of ids (the boundary network loaded once per actor).

    Args: checkpoint (an affinity run's ``final/``), cfg (``data`` and ``affinity``), out_dir,
    cam_dir (``<id>.npz`` CAM files), split, skip_existing, crash_after (as ``PseudoLabeler``).
    """

    def __init__(self, checkpoint: str, cfg: Config, out_dir: str, cam_dir: str, split: str = "train",
                 skip_existing: bool = True, crash_after: int = -1):
        super().__init__(cfg, split, crash_after)
        self.model = _load(checkpoint, "affinity", self.device)
        self.cfg, self.out_dir, self.cam_dir, self.skip_existing = cfg, out_dir, cam_dir, skip_existing

    def job(self, index: int) -> dict:
        return mask_job(self.model, self.dataset, index, self.cam_dir, self.out_dir, self.cfg.affinity,
                        self.skip_existing)


class SegPredictor(_PerImage):
    """Ray Data stage: ``seg_job`` for a batch of ids of ``split``, or of the image files of
    ``images_dir`` (the user's own photos) when given."""

    def __init__(self, checkpoint: str, cfg: Config, out_dir: str, split: str = "val", images_dir: str | None = None,
                 skip_existing: bool = True, crash_after: int = -1):
        if images_dir:
            self.dataset = ImageFolderDataset(images_dir, cfg.data.num_classes, class_names(cfg.data))
            self.index = {sid: i for i, sid in enumerate(self.dataset.ids)}
            self.crash_after, self.calls, self.device = int(crash_after), 0, actor_device()
        else:
            super().__init__(cfg, split, crash_after)
        self.model = _load(checkpoint, "seg", self.device)
        self.cfg, self.out_dir, self.skip_existing = cfg, out_dir, skip_existing

    def job(self, index: int) -> dict:
        return seg_job(self.model, self.dataset, index, self.out_dir, self.cfg.seg, self.cfg.pseudo, self.skip_existing)


def actor_resources(cfg: Config, cpus: float) -> dict:
    """Resources of one mask or prediction actor: ``cpus`` CPUs and, with ``inference.use_gpu``, the
    CAM actors' GPU share (1 / ``inference.cam_actors_per_gpu``): from the config, never from what
    the cluster holds."""
    return {"num_cpus": cpus, **({"num_gpus": 1.0 / cfg.inference.cam_actors_per_gpu} if cfg.inference.use_gpu else {})}


def _run(stage, kwargs: dict, cfg: Config, out_dir, inputs: PipelineInputs, spec: dict, overwrite: bool,
         resources: tuple[float, int], name: str, rows_per_block: int) -> RunSummary:
    t0 = time.monotonic()
    check_run_spec(out_dir, spec, overwrite)
    save_config(inputs.cfg, out_dir / "config.yaml")
    writer = ManifestWriter(out_dir / MANIFEST_DIR, LABEL_SCHEMA, labels_source=inputs.labels_source)
    writer.add(rows_to_table([failed_row(LABEL_SCHEMA, sid, why) for sid, why in inputs.rejected], LABEL_SCHEMA))
    total = len(inputs.ids) + len(inputs.rejected)
    if inputs.ids:
        cpus, max_actors = resources
        ds = _id_dataset(inputs.ids, rows_per_block).map_batches(
            stage, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="pyarrow", compute=elastic_pool(max_actors),
            **actor_resources(inputs.cfg, cpus))
        _drain(ds, writer, total, name)
    return _finish(writer, out_dir, LABEL_SCHEMA, total, t0, name)


def run_make_masks(cfg: Config, checkpoint, out_dir, *, cam_dir, split: str = "train", skip_existing: bool = True,
                   overwrite: bool = False, limit: int = 0, rows_per_block: int = 4, crash_after: int = -1,
                   inputs: PipelineInputs | None = None) -> RunSummary:
    """Pseudo masks ``<out>/<id>.png`` of every image of ``split``: the CAM files of ``cam_dir``
    walked over the affinities of the boundary network ``checkpoint`` (``cfg.affinity``: walk
    settings and actor resources), with ``<out>/manifest.parquet``, ``config.yaml``, ``run_spec.json``."""
    out_dir = location(out_dir)
    check_stage_checkpoint(checkpoint, "affinity")
    inputs = inputs or check_inputs(cfg, split, cam_dir=cam_dir, limit=limit)
    walk = {k: v for k, v in dataclasses.asdict(inputs.cfg.affinity).items()
            if k in ("walk_radius", "beta", "exp_times", "bg_threshold", "walk_mode", "flip")}
    spec = _spec(inputs.cfg, split, checkpoint=str(location(checkpoint)), cam_dir=str(location(cam_dir)), walk=walk)
    kwargs = dict(checkpoint=str(checkpoint), cfg=inputs.worker_cfg, out_dir=str(out_dir), cam_dir=str(cam_dir),
                  split=split, skip_existing=skip_existing and not overwrite, crash_after=crash_after)
    a = inputs.cfg.affinity
    return _run(MaskMaker, kwargs, cfg, out_dir, inputs, spec, overwrite, (a.cpus_per_task, a.max_actors),
                "make_masks", rows_per_block)


def check_image_folder(cfg: Config, images_dir) -> PipelineInputs:
    """``PipelineInputs`` for the photos of a local folder (``ImageFolderDataset``); DataError naming it."""
    dataset = ImageFolderDataset(images_dir, cfg.data.num_classes, class_names(cfg.data))
    return PipelineInputs(cfg, cfg, list(dataset.ids), [], f"none (images of {images_dir})")


def run_seg_predict(cfg: Config, checkpoint, out_dir, *, split: str = "val", images_dir=None,
                    skip_existing: bool = True, overwrite: bool = False, limit: int = 0, rows_per_block: int = 4,
                    crash_after: int = -1, inputs: PipelineInputs | None = None) -> RunSummary:
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
    s = inputs.cfg.seg
    settings = {"scales": list(s.scales), "flip": s.flip, "crf": s.crf}
    if s.crf:
        settings["pseudo"] = {k: v for k, v in dataclasses.asdict(inputs.cfg.pseudo).items()
                              if k not in ("cpus_per_task", "max_crf_actors")}
    source = {"images_dir": str(images_dir)} if images_dir is not None else {}
    spec = {**_spec(inputs.cfg, split if images_dir is None else "", **source), "checkpoint": str(location(checkpoint)),
            "seg": settings}
    kwargs = dict(checkpoint=str(checkpoint), cfg=inputs.worker_cfg, out_dir=str(out_dir), split=split,
                  images_dir=str(images_dir) if images_dir is not None else None,
                  skip_existing=skip_existing and not overwrite, crash_after=crash_after)
    return _run(SegPredictor, kwargs, cfg, out_dir, inputs, spec, overwrite, (s.cpus_per_task, s.max_actors),
                "seg_predict", rows_per_block)
