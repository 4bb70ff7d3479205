"""What a Ray Data stage reads and what decides the bytes it writes, checked without Ray.

The workflows call these checks first, before Ray starts and before ``run_spec.json``,
``config.yaml`` or any output is written, so a bad input leaves the output folder as it was:
``check_inputs`` verifies the checkpoint, the CAM folder and the split; ``check_stage_checkpoint``
that a refine checkpoint is of the right task; ``check_image_folder`` reads a folder of photos.
The ``*_spec`` functions give each stage's run spec (``cpal_ray.inference.manifest.check_run_spec``):
the settings that decide the output bytes, never the actors' resources.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cpal_ray.config import Config
from cpal_ray.data import DataError, ImageFolderDataset, build_dataset, class_names, labels_source, \
    record_labels_source
from cpal_ray.engine import CheckpointError, checkpoint_context, load_checkpoint
from cpal_ray.engine.checkpoint import checkpoint_digest
from cpal_ray.storage import location

SOURCES = {"cam": ("cam",), "pacam": ("pacam",), "both": ("cam", "pacam")}
RESOURCE_FIELDS = ("actor_cpus", "actor_gpus", "max_actors")  # never in a run spec


@dataclass
class StageInputs:
    """What a stage reads, checked by ``check_inputs`` (or ``check_image_folder``).

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
                 limit: int = 0) -> StageInputs:
    """Check a stage's inputs without Ray and without writing: ``checkpoint`` loads and verifies
    (and holds context prototypes when ``source`` needs the PACAM), ``cam_dir`` is a folder, and the
    split builds with at least one usable id. Raises CheckpointError / DataError / ValueError
    naming the input; returns the ``StageInputs`` (``limit``: only the first ids, 0 = all)."""
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
    return StageInputs(cfg, worker_cfg, ids, list(dataset.skipped), labels_source(dataset))


def check_image_folder(cfg: Config, images_dir) -> StageInputs:
    """``StageInputs`` for the photos of a local folder (``ImageFolderDataset``); DataError naming it."""
    dataset = ImageFolderDataset(images_dir, cfg.data.num_classes, class_names(cfg.data))
    return StageInputs(cfg, cfg, list(dataset.ids), [], f"none (images of {images_dir})")


def check_stage_checkpoint(checkpoint, task: str) -> Config:
    """Load and verify a refine checkpoint without Ray; CheckpointError when it is not a ``task``
    checkpoint. Returns its saved config."""
    cfg = load_checkpoint(checkpoint)["config"]
    if cfg.train.task != task:
        raise CheckpointError(f"{checkpoint}: a {cfg.train.task!r} checkpoint (train.task), not {task!r}")
    return cfg


# ----------------------------------------------------------------------- run specs


def _spec(cfg: Config, split: str, **extra) -> dict:
    d = cfg.data
    procedural = {"synthetic": [d.synthetic_classes, d.synthetic_size, d.seed],
                  "attributes": [d.synthetic_classes, d.synthetic_size, d.seed, d.attributes_per_class]}
    return {"dataset": d.dataset, "root": d.root, "split": split, "synthetic": procedural.get(d.dataset), **extra}


def with_checkpoint_digest(spec: dict) -> dict:
    """``spec`` with its ``checkpoint``'s content hash (``checkpoint_sha256``): a model retrained
    into the same folder is another input, and ``check_run_spec`` then refuses the old outputs."""
    if not spec.get("checkpoint"):
        return spec
    return {**spec, "checkpoint_sha256": checkpoint_digest(spec["checkpoint"])}


def _settings(section, keep=None) -> dict:
    """A config section as a dict, without the actors' resources (or only the fields ``keep``)."""
    return {k: v for k, v in dataclasses.asdict(section).items()
            if (k in keep if keep is not None else k not in RESOURCE_FIELDS)}


def _cam_spec(cfg: Config, checkpoint) -> dict:
    inf = cfg.inference
    return {"checkpoint": str(location(checkpoint)), "scales": list(inf.scales), "flip": inf.flip,
            "save_dtype": inf.save_dtype}


def make_cams_spec(inputs: StageInputs, split: str, checkpoint) -> dict:
    """What decides the CAM files of ``run_make_cams`` (its ``run_spec.json``)."""
    return with_checkpoint_digest(_spec(inputs.cfg, split, **_cam_spec(inputs.cfg, checkpoint)))


def pseudo_labels_spec(inputs: StageInputs, split: str, *, cam_dir=None, checkpoint=None) -> dict:
    """What decides the PNGs of ``run_pseudo_labels`` (not the CRF actors' resources)."""
    cfg = inputs.cfg
    cams_spec = _cam_spec(cfg, checkpoint) | {"cam_source": cfg.inference.cam_source} if cam_dir is None else \
        {"cam_dir": str(location(cam_dir))}
    return with_checkpoint_digest(_spec(cfg, split, pseudo=_settings(cfg.pseudo), **cams_spec))


def make_masks_spec(inputs: StageInputs, split: str, checkpoint, cam_dir) -> dict:
    """What decides the masks of ``run_make_masks``: the boundary network, the CAMs, the walk."""
    walk = _settings(inputs.cfg.affinity, ("walk_radius", "beta", "exp_times", "bg_threshold", "walk_mode", "flip"))
    return with_checkpoint_digest(_spec(inputs.cfg, split, checkpoint=str(location(checkpoint)),
                                        cam_dir=str(location(cam_dir)), walk=walk))


def seg_predict_spec(inputs: StageInputs, split: str, checkpoint, images_dir=None) -> dict:
    """What decides the predictions of ``run_seg_predict``: the segmenter, scales, flip, CRF."""
    s = inputs.cfg.seg
    settings = {"scales": list(s.scales), "flip": s.flip, "crf": s.crf}
    if s.crf:
        settings["pseudo"] = _settings(inputs.cfg.pseudo)
    source = {"images_dir": str(images_dir)} if images_dir is not None else {}
    return with_checkpoint_digest({**_spec(inputs.cfg, split if images_dir is None else "", **source),
                                   "checkpoint": str(location(checkpoint)), "seg": settings})
