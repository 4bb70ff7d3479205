"""Ray Data pipelines: CAM files and CRF pseudo-labels over a whole dataset, streaming.

    ids ─► CamPredictor  (actor pool; the model is loaded once per actor; ``inference.cam_cpus``
    │                     CPUs and, with ``inference.use_gpu``, 1/``cam_actors_per_gpu`` GPU each)
    │                                                           ─► <cams>/<id>.npz, pacam/<id>.npz
    └──► PseudoLabeler   (actor pool, ``pseudo.cpus_per_task`` CPUs per actor, one CRF at a
                          time)                                  ─► <out>/<id>.png
    rows ─► driver: ``ManifestWriter`` parquet parts in <out>/manifest/ ─► <out>/manifest.parquet

Resources come from the config (and the workflows' flags), never from what the cluster holds
when the run starts: both pools are elastic (one actor, growing while work waits, up to
``inference.max_cam_actors`` / ``pseudo.max_crf_actors``, 0 = no limit), so on a cluster that
scales from zero they grow as the autoscaler adds nodes. Output folders are local paths or
object-store URIs (``cpal_ray.storage``).

The per-image work (``cam_job``, ``pseudo_label_job``) lives in ``cpal_ray.inference.jobs`` and
is plain Python; the stages here only map it. The driver builds the dataset once to list the
ids, then sees nothing but small rows (id, path, classes, size, seconds, status, error): peak
memory does not grow with the dataset. Pseudo-labels read saved CAMs (``cam_dir``) or, given a
checkpoint, chain both stages and keep the CAMs in ``<out>/cams``.

Checked first, written after: ``check_inputs`` (no Ray) verifies the checkpoint, the CAM folder
and the split before Ray starts (the workflows call it first) and before ``run_spec.json``,
``config.yaml`` or any output is written, so a bad input leaves the output folder as it was.
The saved config and every manifest row name the image-level label file used.

Resuming: every stage first validates the file it would write and skips it when valid, so a
killed run started again redoes only what is missing or broken; outputs are deterministic
and written atomically, so the final files equal those of an uninterrupted run. A bad image or
CAM file gives a ``failed`` row naming the id; the rest of the run goes on (``RunSummary``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from cpal_ray.config import Config, save_config
from cpal_ray.storage import Location, location
from cpal_ray.data import DataError, build_dataset, labels_source, record_labels_source
from cpal_ray.engine import CheckpointError, checkpoint_context, load_checkpoint
from cpal_ray.distributed.runtime import actor_device
from cpal_ray.inference.jobs import (CAM_SCHEMA, LABEL_SCHEMA, ManifestWriter, cam_job, check_run_spec,
                                     consolidate_manifest, failed_row, pseudo_label_job, rows_to_table, source_dir)

log = logging.getLogger(__name__)

SOURCES = {"cam": ("cam",), "pacam": ("pacam",), "both": ("cam", "pacam")}
MANIFEST_DIR, MANIFEST_FILE = "manifest", "manifest.parquet"


@dataclass
class RunSummary:
    """What a pipeline run did. counts: {"done", "skipped", "failed"}; failures: (id, error), first 100."""
    out_dir: Location
    manifest: Location
    total: int
    counts: dict
    failures: list
    seconds: float

    @property
    def ok(self) -> bool:
        return self.counts.get("failed", 0) == 0

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "manifest": str(self.manifest), "total": self.total,
                **self.counts, "seconds": round(self.seconds, 2), "failures": [list(f) for f in self.failures]}


def _column(batch, name: str) -> list | None:
    """Column ``name`` of a batch (pyarrow Table or dict of numpy arrays) as a list, or None."""
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist() if name in batch.column_names else None
    return [x.item() if hasattr(x, "item") else x for x in batch[name]] if name in batch else None


class _Stage:
    """Shared by the stages: the eval dataset built once per actor, id -> index, the crash knob,
    and the device (``cuda`` only when Ray granted this actor a GPU: ``actor_device``)."""

    def __init__(self, cfg: Config, split: str, crash_after: int):
        self.device = actor_device()
        self.dataset = build_dataset(cfg.data, split, train=False)
        self.index = {sid: i for i, sid in enumerate(self.dataset.ids)}
        self.crash_after = int(crash_after)
        self.calls = 0

    def _tick(self) -> None:
        if 0 <= self.crash_after <= self.calls:
            raise RuntimeError(f"crash_after={self.crash_after} reached (test knob: a simulated crash)")
        self.calls += 1


class CamPredictor(_Stage):
    """Ray Data stage: multi-scale (+flip) CAM files for a batch of ids.

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

    ``__call__({"id": (B,) str})`` -> pyarrow Table of ``CAM_SCHEMA`` rows (no arrays).
    """

    def __init__(self, checkpoint_dir: str, cfg: Config, out_dir: str, split: str = "val", source: str = "cam",
                 skip_existing: bool = True, label_dir: str | None = None, crash_after: int = -1):
        from cpal_ray.engine.tasks import load_trained

        super().__init__(cfg, split, crash_after)
        self.model, self.cfg, context = load_trained(checkpoint_dir, cfg=cfg)
        self.model.to(self.device)
        self.sources = SOURCES[source]
        if "pacam" in self.sources and context is None and not self.cfg.cpal.own_prototypes:
            raise ValueError(f"{checkpoint_dir}: no context prototypes in this checkpoint; PACAM needs them")
        self.context = context.to(self.device) if "pacam" in self.sources and context is not None else None
        self.out_dir, self.skip_existing, self.label_dir = out_dir, skip_existing, label_dir

    def __call__(self, batch) -> pa.Table:
        rows, inf = [], self.cfg.inference
        for sid in map(str, _column(batch, "id")):
            self._tick()
            if sid not in self.index:
                rows.append(failed_row(CAM_SCHEMA, sid, "not in the dataset read by this worker"))
                continue
            rows.append(cam_job(self.model, self.dataset, self.index[sid], self.out_dir, sources=self.sources,
                                scales=inf.scales, flip=inf.flip, save_dtype=inf.save_dtype, context=self.context,
                                cpal_cfg=self.cfg.cpal, skip_existing=self.skip_existing, label_dir=self.label_dir))
        return rows_to_table(rows, CAM_SCHEMA)


class PseudoLabeler(_Stage):
    """Ray Data stage: CRF pseudo-label PNGs (``pseudo.mode`` irn / crf_argmax) for a batch of ids.

    Args:
        cfg: the run's Config (``data`` and ``pseudo``).
        out_dir: ``<out>/<id>.png`` (VOC palette, atomic).
        cam_dir: where ``<id>.npz`` CAM files are read.
        split, skip_existing, crash_after: as for ``CamPredictor``.

    ``__call__(batch)``: "id" column, plus "status"/"error" when chained after ``CamPredictor``
    (a failed CAM row stays failed). Returns a pyarrow Table of ``LABEL_SCHEMA`` rows.
    """

    def __init__(self, cfg: Config, out_dir: str, cam_dir: str, split: str = "train", skip_existing: bool = True,
                 crash_after: int = -1):
        super().__init__(cfg, split, crash_after)
        self.cfg, self.out_dir, self.cam_dir, self.skip_existing = cfg, out_dir, cam_dir, skip_existing

    def __call__(self, batch) -> pa.Table:
        ids = list(map(str, _column(batch, "id")))
        status = _column(batch, "status") or [""] * len(ids)
        errors = _column(batch, "error") or [""] * len(ids)
        rows = []
        for sid, st, err in zip(ids, status, errors):
            self._tick()
            if st == "failed":
                rows.append(failed_row(LABEL_SCHEMA, sid, f"CAM stage: {err.removeprefix(f'id {sid}: ')}"))
            elif sid not in self.index:
                rows.append(failed_row(LABEL_SCHEMA, sid, "not in the dataset read by this worker"))
            else:
                rows.append(pseudo_label_job(self.dataset, self.index[sid], self.cam_dir, self.out_dir,
                                             self.cfg.pseudo, self.skip_existing))
        return rows_to_table(rows, LABEL_SCHEMA)


# ------------------------------------------------------------------------------------ driver


@dataclass
class PipelineInputs:
    """What a pipeline run reads, checked by ``check_inputs``.

    cfg: the run's config with ``data.cls_labels`` naming the label file in use (it is saved);
    worker_cfg: the same with ``data.on_bad_sample="skip"`` (a bad id is a failed row, not a
    failed worker); ids: the ids to process; rejected: (id, reason) of the ids the reader left
    out (missing image, bad label); labels_source: the label file, for the manifest.
    """
    cfg: Config
    worker_cfg: Config
    ids: list
    rejected: list
    labels_source: str


def check_inputs(cfg: Config, split: str, *, checkpoint=None, cam_dir=None, source: str = "cam",
                 limit: int = 0) -> PipelineInputs:
    """Check a pipeline's inputs without Ray and without writing: ``checkpoint`` loads and verifies
    (and holds context prototypes when ``source`` needs the PACAM), ``cam_dir`` is a folder, and the
    split builds with at least one usable id. Raises CheckpointError / DataError / ValueError
    naming the input; returns the ``PipelineInputs`` (``limit``: only the first ids, 0 = all)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {tuple(SOURCES)}, got {source!r}")
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        if "pacam" in SOURCES[source] and checkpoint_context(state) is None and not cfg.cpal.own_prototypes:
            raise CheckpointError(f"{checkpoint}: no context prototypes in this checkpoint; source={source!r} needs them")
    if cam_dir is not None and not location(cam_dir).is_dir():
        raise DataError(f"{cam_dir}: no such CAM folder")
    worker_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_bad_sample="skip"))
    dataset = build_dataset(worker_cfg.data, split, train=False)
    ids = list(dataset.ids)[:limit] if limit else list(dataset.ids)
    cfg = dataclasses.replace(cfg, data=record_labels_source(cfg.data, dataset))
    worker_cfg = dataclasses.replace(worker_cfg, data=record_labels_source(worker_cfg.data, dataset))
    return PipelineInputs(cfg, worker_cfg, ids, list(dataset.skipped), labels_source(dataset))


def _id_dataset(ids: list[str], rows_per_block: int):
    n_blocks = max(1, min(len(ids), math.ceil(len(ids) / max(1, rows_per_block))))
    return ray.data.from_items([{"id": sid} for sid in ids], override_num_blocks=n_blocks)


def cam_actor_resources(inference) -> dict:
    """Resources of one CAM actor, from the config alone (never from what the cluster has now):
    ``cam_cpus`` CPUs and, with ``use_gpu``, 1 / ``cam_actors_per_gpu`` of a GPU."""
    res = {"num_cpus": inference.cam_cpus}
    if inference.use_gpu:
        res["num_gpus"] = 1.0 / inference.cam_actors_per_gpu
    return res


def elastic_pool(max_actors: int) -> ActorPoolStrategy:
    """An actor pool that starts with one actor and grows while work waits and the cluster
    (or its autoscaler) gives resources, up to ``max_actors`` (0 = no limit)."""
    return ActorPoolStrategy(min_size=1, max_size=max_actors or None)


def _add_cam_stage(ds, cfg: Config, checkpoint, out_dir: Location, split: str, source: str, skip_existing: bool,
                   label_dir: Location | None, crash_after: int):
    kwargs = dict(checkpoint_dir=str(checkpoint), cfg=cfg, out_dir=str(out_dir), split=split, source=source,
                  skip_existing=skip_existing, label_dir=str(label_dir) if label_dir else None,
                  crash_after=crash_after)
    return ds.map_batches(CamPredictor, fn_constructor_kwargs=kwargs, compute=elastic_pool(cfg.inference.max_cam_actors),
                          batch_size=1, batch_format="pyarrow", **cam_actor_resources(cfg.inference))


def _drain(ds, writer: ManifestWriter, total: int, name: str, progress_every: float = 10.0) -> None:
    """Pull the row blocks to the driver, one at a time, into the manifest; log counts."""
    last = time.monotonic()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(batch)
            if time.monotonic() - last >= progress_every:
                log.info("%s: %d/%d %s", name, writer.seen, total, writer.counts)
                last = time.monotonic()
    finally:
        writer.flush()


def _finish(writer: ManifestWriter, out_dir: Location, schema: pa.Schema, total: int, t0: float, name: str) -> RunSummary:
    manifest = out_dir / MANIFEST_FILE
    consolidate_manifest(out_dir / MANIFEST_DIR, manifest, schema)
    summary = RunSummary(out_dir, manifest, total, dict(writer.counts), list(writer.failures), time.monotonic() - t0)
    log.info("%s: %d ids: %s in %.1fs; manifest %s", name, total, summary.counts, summary.seconds, manifest)
    for sid, err in summary.failures[:20]:
        log.warning("%s failed: %s", name, err)
    return summary


def _spec(cfg: Config, split: str, **extra) -> dict:
    d = cfg.data
    procedural = {"synthetic": [d.synthetic_classes, d.synthetic_size, d.seed],
                  "attributes": [d.synthetic_classes, d.synthetic_size, d.seed, d.attributes_per_class]}
    return {"dataset": d.dataset, "root": d.root, "split": split, "synthetic": procedural.get(d.dataset), **extra}


def _cam_spec(cfg: Config, checkpoint) -> dict:
    inf = cfg.inference
    return {"checkpoint": str(location(checkpoint)), "scales": list(inf.scales), "flip": inf.flip,
            "save_dtype": inf.save_dtype}


def make_cams_spec(inputs: PipelineInputs, split: str, checkpoint) -> dict:
    """What decides the CAM files of ``run_make_cams`` (its ``run_spec.json``)."""
    return _spec(inputs.cfg, split, **_cam_spec(inputs.cfg, checkpoint))


def pseudo_labels_spec(inputs: PipelineInputs, split: str, *, cam_dir=None, checkpoint=None) -> dict:
    """What decides the PNGs of ``run_pseudo_labels`` (not the CRF actors' resources)."""
    cfg = inputs.cfg
    cams_spec = _cam_spec(cfg, checkpoint) | {"cam_source": cfg.inference.cam_source} if cam_dir is None else \
        {"cam_dir": str(location(cam_dir))}
    pseudo = {k: v for k, v in dataclasses.asdict(cfg.pseudo).items() if k not in ("cpus_per_task", "max_crf_actors")}
    return _spec(cfg, split, pseudo=pseudo, **cams_spec)


def run_make_cams(cfg: Config, checkpoint, out_dir, *, split: str = "val", source: str = "cam",
                  skip_existing: bool = True, overwrite: bool = False, limit: int = 0, rows_per_block: int = 4,
                  crash_after: int = -1, inputs: PipelineInputs | None = None) -> RunSummary:
    """CAM files for every image of ``split``: ``<out>/<id>.npz`` and/or ``<out>/pacam/<id>.npz``,
    ``<out>/manifest.parquet``, ``<out>/config.yaml`` (the resolved config) and ``run_spec.json``.

    cfg: data, inference settings and the CAM actors' resources (``inference.use_gpu``,
    ``cam_actors_per_gpu``, ``cam_cpus``, ``max_cam_actors``; ``model`` must match the
    checkpoint); checkpoint, out_dir: local paths or URIs; source: "cam", "pacam", "both";
    overwrite: recompute everything, even files made with other settings; limit: only the first
    ``limit`` ids (0 = all); inputs: what ``check_inputs`` returned for these arguments (checked
    here when not given; nothing is written when the check fails).
    """
    t0, out_dir = time.monotonic(), location(out_dir)
    inputs = inputs or check_inputs(cfg, split, checkpoint=checkpoint, source=source, limit=limit)
    check_run_spec(out_dir, make_cams_spec(inputs, split, checkpoint), overwrite)
    save_config(inputs.cfg, out_dir / "config.yaml")
    cfg, ids, rejected = inputs.worker_cfg, inputs.ids, inputs.rejected
    writer = ManifestWriter(out_dir / MANIFEST_DIR, CAM_SCHEMA, labels_source=inputs.labels_source)
    writer.add(rows_to_table([failed_row(CAM_SCHEMA, sid, reason) for sid, reason in rejected], CAM_SCHEMA))
    if ids:
        ds = _add_cam_stage(_id_dataset(ids, rows_per_block), cfg, checkpoint, out_dir, split, source,
                            skip_existing and not overwrite, None, crash_after)
        _drain(ds, writer, len(ids) + len(rejected), "make_cams")
    return _finish(writer, out_dir, CAM_SCHEMA, len(ids) + len(rejected), t0, "make_cams")


def run_pseudo_labels(cfg: Config, out_dir, *, cam_dir=None, checkpoint=None, split: str = "train",
                      skip_existing: bool = True, overwrite: bool = False, limit: int = 0, rows_per_block: int = 4,
                      crash_after: int = -1, inputs: PipelineInputs | None = None) -> RunSummary:
    """Pseudo-label PNGs ``<out>/<id>.png`` for every image of ``split`` + ``<out>/manifest.parquet``.

    CAMs come from ``cam_dir`` (files of ``run_make_cams``) or, without it, are computed from
    ``checkpoint`` (``cfg.inference.cam_source``, CAM actors as in ``run_make_cams``) into
    ``<out>/cams``. cfg.pseudo: mode, preset, CRF parameters, ``cpus_per_task`` (CPUs per CRF
    actor) and ``max_crf_actors``. A folder made with other settings is refused unless
    ``overwrite`` (which also redoes every file). Other arguments as ``run_make_cams``.
    """
    t0, out_dir = time.monotonic(), location(out_dir)
    if cam_dir is None and checkpoint is None:
        raise ValueError("pseudo-labels need saved CAMs (cam_dir) or a checkpoint to compute them")
    on_the_fly = cam_dir is None
    inputs = inputs or check_inputs(cfg, split, checkpoint=checkpoint if on_the_fly else None, cam_dir=cam_dir,
                                    source=cfg.inference.cam_source, limit=limit)
    cfg = inputs.cfg
    skip_existing = skip_existing and not overwrite
    check_run_spec(out_dir, pseudo_labels_spec(inputs, split, cam_dir=cam_dir, checkpoint=checkpoint), overwrite)
    save_config(cfg, out_dir / "config.yaml")
    cfg, ids, rejected = inputs.worker_cfg, inputs.ids, inputs.rejected
    writer = ManifestWriter(out_dir / MANIFEST_DIR, LABEL_SCHEMA, labels_source=inputs.labels_source)
    writer.add(rows_to_table([failed_row(LABEL_SCHEMA, sid, reason) for sid, reason in rejected], LABEL_SCHEMA))
    if ids:
        ds = _id_dataset(ids, rows_per_block)
        if on_the_fly:
            source = cfg.inference.cam_source
            cam_root = out_dir / "cams"
            cam_dir = source_dir(cam_root, source)
            ds = _add_cam_stage(ds, cfg, checkpoint, cam_root, split, source, skip_existing, out_dir, -1)
        kwargs = dict(cfg=cfg, out_dir=str(out_dir), cam_dir=str(cam_dir), split=split, skip_existing=skip_existing,
                      crash_after=crash_after)
        ds = ds.map_batches(PseudoLabeler, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="pyarrow",
                            compute=elastic_pool(cfg.pseudo.max_crf_actors), num_cpus=cfg.pseudo.cpus_per_task)
        _drain(ds, writer, len(ids) + len(rejected), "pseudo_labels")
    return _finish(writer, out_dir, LABEL_SCHEMA, len(ids) + len(rejected), t0, "pseudo_labels")
