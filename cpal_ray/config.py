"""Run configuration: frozen dataclasses, one per concern, validated on construction.

Defaults are the paper's (CPAL, CVPR 2024, Sec. 4.1). A config is loaded from YAML with
dotted overrides (``cpal.tau=0.2``) and saved as YAML beside every checkpoint and output.
Every invalid value raises ``ConfigError`` naming the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("voc", "coco", "synthetic", "attributes")
METRICS = ("dot", "l1", "l2", "cosine")
CAM_SOURCES = ("cam", "pacam")
CENTERS = ("none", "image")
# The pixel embedding z of Eqs. 4 and 13 (model.embedding): an MLP head on the last stage, or
# SIPE's hierarchical feature (side convs on every detached backbone stage).
EMBEDDINGS = ("head", "hierarchical")
# The PACAM's background channel (cpal.background): 1 - max of the foreground PACAM, or the
# cosine map of a background prototype (the background is class N of the bank).
BACKGROUNDS = ("one_minus_max", "prototype")
# Where the PACAM's prototypes come from (cpal.context): the bank's context prototypes (CPAL) or
# each image's own instance prototypes (SIPE's IS-CAM; no bank).
CONTEXTS = ("bank", "instance")
# The region an instance prototype averages over (cpal.region): M_n > tau (Eq. 4) or SIPE's seeds.
REGIONS = ("threshold", "sipe")
# Which map L_self moves (cpal.self_grad): both, the CAM only (PACAM a target), the PACAM only.
SELF_GRADS = ("both", "cam", "pacam")
PSEUDO_MODES = ("irn", "crf_argmax")
# What a training run trains (train.task): the CAM network (CPAL or the BCE baseline), IRN's
# boundary network for the affinities (refine stage 1), or the segmentation network (stage 2).
TASKS = ("cam", "affinity", "seg")
WALK_MODES = ("average", "mass")
# Named (conf_fg, conf_bg) presets for IRN-style pseudo-labels.
PSEUDO_PRESETS = {"irn": (0.30, 0.05), "amn": (0.45, 0.15)}
# The configs shipped inside the package (configs/<name>.yaml names them from anywhere).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
log = logging.getLogger(__name__)
# The data shipped inside the package (real photos, see cpal_ray/assets/voc_mini/PROVENANCE.md).
BUNDLED_VOC_MINI = "bundled:voc-mini"


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (and the file or the override it
    came from); ``field`` is the dotted field name."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}", field=name)


# A rule of a section's validation: (field, test of its value, what the error says; "{v}" = the value).
Rule = tuple[str, typing.Callable[[Any], bool], str]


def _validate(section: str, obj: Any, *rules: Rule) -> None:
    """Check ``rules`` on the fields of ``obj`` in order; the first that fails raises ConfigError
    naming ``section.field``."""
    for name, test, message in rules:
        value = getattr(obj, name)
        _check(test(value), f"{section}.{name}", message.format(v=value))


def _at_least(name: str, low: float, note: str = "") -> Rule:
    return name, lambda v: v >= low, f"must be >= {low}{note}"


def _positive(name: str, note: str = "") -> Rule:
    return name, lambda v: v > 0, f"must be > 0{note}"


def _one_of(name: str, choices: tuple, note: str = "") -> Rule:
    return name, lambda v: v in choices, f"must be one of {choices}{note}"


def _long_side_range(name: str = "resize_long") -> Rule:
    return (name, lambda v: len(v) == 2 and 0 < v[0] <= v[1],
            "must be (min, max) with 0 < min <= max, got {v}")


def _scales(name: str = "scales") -> Rule:
    return (name, lambda v: len(v) >= 1 and all(s > 0 for s in v),
            "must be a non-empty list of positive numbers, got {v}")


# A run name is one safe path component: it cannot leave its storage folder ("..", "/") or hide.
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,199}")


def check_run_name(name: str, field: str = "train.name") -> str:
    """``name`` when it is one safe folder name (letters, digits, ``_ . + = -``, not starting with
    a dot); ConfigError naming ``field`` otherwise."""
    _check(isinstance(name, str) and _RUN_NAME.fullmatch(name) is not None, field,
           f"must be one folder name (letters, digits, _ . + = -, not starting with '.'), got {name!r}")
    return name


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that numbers in scientific notation without a dot
    (``1e6``, ``5e-4``) are floats, not strings."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


@dataclass(frozen=True)
class DataConfig:
    # Which reader: PASCAL VOC 2012 layout, COCO 2014 (WSSS layout), procedural shapes
    # ("synthetic") or procedural objects made of attribute parts ("attributes").
    dataset: str = "voc"
    # Dataset root (VOCdevkit/VOC2012 or the COCO WSSS folder); "bundled:voc-mini" = shipped photos.
    root: str = BUNDLED_VOC_MINI
    # Id list used for training / evaluation (a name like "train_aug" or a path to a .txt).
    train_split: str = "train"
    val_split: str = "val"
    # Image-level labels: a cls_labels.json, or an np.save'd dict (.npy, read without running code),
    # or a "bundled:" name ("bundled:voc12"); "" = <root>/cls_labels.json, else <root>/cls_labels.npy,
    # else (VOC only, with a WARNING) the packaged VOC 2012 labels. Runs save the file they used here.
    cls_labels: str = ""
    # Folder of ground-truth masks under root; "" = the dataset's own default
    # ("SegmentationClass" for VOC — use "SegmentationClassAug" for train_aug — and "mask" for COCO).
    mask_dir: str = ""
    # Synthetic and attributes sets only: classes, images per split, image side, seed.
    synthetic_classes: int = 4
    synthetic_images: int = 32
    synthetic_size: int = 96
    seed: int = 0
    # Attributes set only: appearances per class (signature, unique rare ones, one shared).
    attributes_per_class: int = 4
    # Image files (and their masks) whose long side is longer are downscaled to it as they are
    # read, everywhere (training, CAMs, CRF, masks, scoring: at the smaller size); 0 = as stored.
    # The photo config's 400 keeps the demo's CRF and random walk within its 2-core budget.
    max_side: int = 0
    # Training augmentation (Sec. 4.1): random long side, flip, crop (padding label 255).
    resize_long: tuple[int, int] = (320, 640)
    crop_size: int = 512
    hflip: bool = True
    # torch DataLoader workers per training process.
    loader_workers: int = 0
    # A bad sample (missing or unreadable image or mask, no positive label): "error" stops with its
    # file and id; "skip" leaves it out (training: replaced in its batch by the next readable image,
    # counted in the epoch's skipped_samples; pipelines: a failed manifest row).
    on_bad_sample: str = "error"
    # The most pixels an image, mask or label file may have, read from its header before anything
    # is decoded: a larger one (a decompression bomb) is a bad sample naming its file.
    max_image_pixels: int = 64_000_000

    def __post_init__(self):
        _validate("data", self, _one_of("dataset", DATASETS, ", got {v!r}"), _long_side_range(),
                  _positive("crop_size", ", got {v}"), _at_least("synthetic_classes", 1),
                  _at_least("synthetic_images", 1), _at_least("synthetic_size", 32),
                  ("attributes_per_class", lambda v: 2 <= v <= 16, "must be in [2, 16], got {v}"),
                  _at_least("loader_workers", 0), _at_least("max_side", 0, " (0 = as stored), got {v}"),
                  ("on_bad_sample", lambda v: v in ("error", "skip"), "must be 'error' or 'skip'"),
                  _at_least("max_image_pixels", 1, ", got {v}"))

    @property
    def num_classes(self) -> int:
        """Foreground classes N (background excluded)."""
        return {"voc": 20, "coco": 80}.get(self.dataset, self.synthetic_classes)


@dataclass(frozen=True)
class ModelConfig:
    # Backbone name from the registry (cpal_ray.models.list_backbones()).
    backbone: str = "resnet50"
    # Load ImageNet weights: the shipped ones for efficientnet_lite0, `weights` for resnet50.
    pretrained: bool = True
    # Local weights file (torch.load(weights_only=True)); required for pretrained resnet50.
    weights: str = ""
    # Projection head v(.) output dim D (Eq. 4); 0 = identity, PACAM in feature space
    # (DESIGN.md, 'Reading the paper: PACAM space').
    proj_dim: int = 128
    # The space of Eqs. 4 and 13 (DESIGN.md, 'Reading the paper: PACAM space'): "head" = v(.) on the last stage's
    # features (proj_dim); "hierarchical" = SIPE's: bias-free 1x1 side convs on the *detached*
    # output of each of the last 4 backbone stages, each L2-normalised per pixel, resized to the
    # stride-16 grid and concatenated (128+128+256+256 = 768 d; proj_dim is then unused).
    embedding: str = "head"
    # Freeze BatchNorm statistics and affine parameters of the backbone (as SIPE does).
    freeze_bn: bool = True
    # Channels of the tiny test backbone.
    tiny_width: int = 32

    def __post_init__(self):
        from cpal_ray.models import list_backbones  # the registry owns the names

        known = list_backbones()
        _validate("model", self, ("backbone", lambda v: v in known, f"unknown backbone {{v!r}}; choose from {known}"),
                  _at_least("proj_dim", 0, ", got {v}"), _one_of("embedding", EMBEDDINGS, ", got {v!r}"),
                  _at_least("tiny_width", 4))


@dataclass(frozen=True)
class CPALConfig:
    # False = plain CAM baseline (BCE only, no bank): Table 1 row I.
    enabled: bool = True
    # tau of Eq. 4: pixels with M_n > tau form the instance prototype.
    tau: float = 0.1
    # Per-class FIFO support bank length (Sec. 4.1: 1000).
    bank_size: int = 1000
    # N_p: k-means clusters (context prototypes) per class (Eq. 5).
    num_clusters: int = 50
    # K of Eq. 6: soft positive neighbours kept per anchor.
    top_k: int = 20
    # Positiveness similarity of Eq. 7 (Table 3): dot, l1, l2, cosine.
    metric: str = "dot"
    # gamma of Eq. 7, a softmax temperature (DESIGN.md, 'Reading the paper: similarity and gamma');
    # 1 = literal paper.
    gamma: float = 1.0
    # lambda_BCE and lambda_Self of Eq. 1.
    lambda_bce: float = 1.0
    lambda_self: float = 1.0
    # Ablation switches (Tables 1 and 2).
    neighbour_selection: bool = True   # top-K of Eq. 6; False = all N_p prototypes
    positiveness: bool = True          # weights of Eq. 7; False = uniform 1/K (literal Eq. 13)
    alignment: bool = True             # shift delta_n of Eq. 12
    self_loss: bool = True             # L_self of Eq. 14; False = BCE only, PACAM at inference
    # L2-normalise instance prototypes (anchors and bank entries) and run spherical k-means: the
    # whole prototype pipeline then lives on the unit sphere, like the cosines (DESIGN.md, 'Reading
    # the paper: normalised bank').
    normalize_bank: bool = True
    # Divide each PACAM map by its max (as Eq. 3 does for the CAM); False = literal Eq. 13.
    pacam_normalize: bool = False
    # Centring of the pixel embedding before Eq. 4 and Eq. 13: "image" subtracts each image's
    # mean embedding (cpal_ray.cpal.cams.centered_embedding); "none" is the literal paper, whose
    # PACAM was measured flat (object/background ratio 1.0) and collapses L_self (DESIGN.md,
    # 'Reading the paper: PACAM space').
    center: str = "image"
    # k-means (faiss, k-means++ init): iterations, restarts kept best-of, seed.
    kmeans_iters: int = 20
    kmeans_redo: int = 5
    kmeans_seed: int = 1234
    # Cold start (DESIGN.md, 'Reading the paper: cold start'): steps of epoch 0 after which a first
    # clustering runs; 0 = paper reading (cluster only at the start of each epoch, so epoch 0 is BCE only).
    warmup_cluster_steps: int = 0
    # S class shards of the support bank (cpal_ray.cpal.shards): class c in shard c % S, each a
    # Ray actor of its own clustering in parallel; 1 = one bank actor. At most one shard per class.
    bank_shards: int = 1
    # The PACAM's background channel (DESIGN.md, 'Reading the paper: background'): "one_minus_max" = 1 - max_n of
    # the foreground PACAM; "prototype" = the background is class N of the bank (own FIFO, k-means
    # and context prototypes), its instance prototype the mean of z where M_b > tau, and its PACAM
    # channel its own cosine map, as SIPE's IS-CAM makes all N + 1 channels.
    background: str = "one_minus_max"
    # "bank" = CPAL's context prototypes; "instance" = each image's own instance prototypes in
    # their place (SIPE's IS-CAM: no bank, no k-means, no top-K/positiveness/alignment; L_self
    # from the first step).
    context: str = "bank"
    # Which map L_self moves: "both" (the paper), "cam" (the PACAM is a target, no gradient
    # through it) or "pacam" (the CAM is the target).
    self_grad: str = "both"
    # The pixels an instance prototype averages: "threshold" = M_n > tau (Eq. 4, the paper);
    # "sipe" = SIPE's seed regions, one class per pixel by the soft IoU of its feature correlation
    # with each map, the background's halved (cpal_ray.cpal.cams.sipe_regions; tau unused).
    region: str = "threshold"

    @property
    def uses_bank(self) -> bool:
        """A support bank (and its actor, k-means, checkpointed state) is needed."""
        return self.enabled and self.context == "bank"

    @property
    def own_prototypes(self) -> bool:
        """The PACAM is made from each image's own prototypes (the SIPE arm): it needs no context."""
        return self.enabled and self.context == "instance"

    def __post_init__(self):
        _validate("cpal", self, ("tau", lambda v: 0.0 < v < 1.0, "must be in (0, 1), got {v}"),
                  _at_least("bank_size", 1, ", got {v}"),
                  ("num_clusters", lambda v: 1 <= v <= self.bank_size, f"must be in [1, bank_size={self.bank_size}], got {{v}}"),
                  ("top_k", lambda v: 1 <= v <= self.num_clusters, f"must be in [1, num_clusters={self.num_clusters}], got {{v}}"),
                  ("metric", lambda v: v in METRICS, f"unknown metric {{v!r}}; choose from {METRICS}"),
                  _one_of("center", CENTERS, ", got {v!r}"), _positive("gamma", ", got {v}"),
                  _at_least("lambda_bce", 0), _at_least("lambda_self", 0), _at_least("kmeans_iters", 1),
                  _at_least("kmeans_redo", 1), _at_least("warmup_cluster_steps", 0), _at_least("bank_shards", 1, ", got {v}"),
                  *(_one_of(name, choices, ", got {v!r}") for name, choices in (
                      ("background", BACKGROUNDS), ("context", CONTEXTS), ("region", REGIONS), ("self_grad", SELF_GRADS))))


@dataclass(frozen=True)
class OptimConfig:
    # Backbone learning rate; new layers (classifier, projection) get lr * new_layer_lr_mult.
    lr: float = 0.1
    new_layer_lr_mult: float = 10.0
    # The paper's 0.9; SIPE/IRN's public optimiser wrapper effectively used 1e-4.
    momentum: float = 0.9
    # L2 weight decay of SGD (Sec. 4.1: 1e-4).
    weight_decay: float = 1e-4
    # Poly schedule lr * (1 - step / total) ** power, stepped per global batch.
    poly_power: float = 0.9
    # Clip the global gradient norm to this value; 0 = no clipping.
    grad_clip: float = 0.0

    def __post_init__(self):
        _validate("optim", self, _positive("lr", ", got {v}"), _positive("new_layer_lr_mult"),
                  ("momentum", lambda v: 0.0 <= v < 1.0, "must be in [0, 1), got {v}"),
                  _at_least("weight_decay", 0), _at_least("poly_power", 0), _at_least("grad_clip", 0))


@dataclass(frozen=True)
class TrainConfig:
    # Epochs (Sec. 4.1: 5); one clustering of the bank at the start of each.
    epochs: int = 5
    # Global batch (all workers together); per-worker batch = batch_size / dist.num_workers.
    batch_size: int = 16
    # Seed of the model init, the sampler's permutations and the augmentations.
    seed: int = 0
    # Stop an epoch after this many steps (smoke runs); 0 = the whole epoch.
    max_steps_per_epoch: int = 0
    # Log a line every this many steps.
    log_every: int = 10
    # Training images scored at each epoch's end for the run's diagnostics (seed mIoU of CAM and
    # PACAM, their contrast and agreement; cpal_ray.engine.diagnostics_hook); 0 = off.
    diag_images: int = 0
    # MLflow tracking server (or file:// store) for Ray runs, through Ray's integration; "" = off.
    # TensorBoard files, history.json and curves.png are always written into the run folder.
    mlflow_uri: str = ""
    # Checkpoints kept per Ray run (Ray's CheckpointConfig num_to_keep, the newest): 0 = all; at
    # least 2 so a damaged newest one has a verified fallback. Sweeps keep 2 per trial when 0.
    keep_checkpoints: int = 0
    # Where runs are written (local path or URI) and the run's name (resume = same name).
    storage_path: str = "results"
    name: str = "cpal"
    # What this run trains: "cam" (CPAL / baseline), "affinity" (IRN boundary network on CRF seeds)
    # or "seg" (segmentation network on pseudo masks). The stage commands set it (``Config.for_task``);
    # it picks the settings the run trains with (``Config.training``: a refine stage reads epochs,
    # batch, lr, crop and resize from its own section) and tells a checkpoint's loader which network
    # to rebuild.
    task: str = "cam"

    def __post_init__(self):
        _validate("train", self, _one_of("task", TASKS, ", got {v!r}"), _at_least("epochs", 1, ", got {v}"),
                  _at_least("batch_size", 1, ", got {v}"), _at_least("max_steps_per_epoch", 0),
                  _at_least("log_every", 1), _at_least("diag_images", 0, " (0 = off)"),
                  ("keep_checkpoints", lambda v: v == 0 or v >= 2, "must be 0 (all) or >= 2 (a verified fallback), got {v}"))
        check_run_name(self.name, "train.name")


@dataclass(frozen=True)
class DistConfig:
    # Ray Train workers (data parallel) and their resources.
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Bank actor resources: CPU share (0 by default) and GPU share for faiss k-means, per actor
    # (each of the cpal.bank_shards shards gets them).
    bank_cpus: float = 0.0
    bank_gpus: float = 0.0
    # Bounded number of fire-and-forget bank sends in flight per worker (a send = one call per shard).
    max_pushes_in_flight: int = 4
    # A worker sends its prototypes to the bank every n steps in one call (still one key per
    # step); 1 = every step. Every rank flushes at each clustering (collective), which the loop runs
    # right before each checkpoint.
    bank_push_every: int = 1
    # Ray Train FailureConfig(max_failures); -1 = retry forever.
    max_failures: int = 0
    # Tune trials run at once by a sweep; 0 = what the cluster holds when the sweep starts (an
    # autoscaling cluster that starts from zero must set it: e.g. its max worker nodes).
    max_concurrent_trials: int = 0

    def __post_init__(self):
        _check(self.bank_cpus >= 0 and self.bank_gpus >= 0, "dist.bank_cpus/bank_gpus", "must be >= 0")
        _validate("dist", self, _at_least("num_workers", 1, ", got {v}"), _positive("cpus_per_worker"),
                  _at_least("max_pushes_in_flight", 1), _at_least("bank_push_every", 1), _at_least("max_failures", -1),
                  _at_least("max_concurrent_trials", 0, " (0 = what the cluster holds)"))


def _stage_training_rules() -> tuple[Rule, ...]:
    """The rules of the training fields a refine stage's section holds (affinity.*, seg.*)."""
    return (_at_least("epochs", 1), _at_least("batch_size", 1), _positive("lr"), _at_least("crop_size", 16),
            _long_side_range())


@dataclass(frozen=True)
class FaultsConfig:
    # TEST-ONLY fault injection (the fault-tolerance tests set it; a production run leaves it off).
    # At global step at_step (-1 = off), training process kill_rank dies once (target "worker"), or
    # rank 0 kills the bank actor (target "bank"; shard 0 of a sharded bank).
    target: str = "worker"
    kill_rank: int = 0
    at_step: int = -1
    # target "worker" only: > 0 = the rank waits this many seconds to be killed from outside (its
    # PID is in <run>/.fault_worker_done) instead of exiting by itself.
    wait_s: float = 0.0

    def __post_init__(self):
        _validate("faults", self, _one_of("target", ("worker", "bank"), ", got {v!r}"), _at_least("kill_rank", 0),
                  _at_least("at_step", -1, " (-1 = off)"), _at_least("wait_s", 0))

    @property
    def enabled(self) -> bool:
        """A fault is injected in this run (``at_step >= 0``)."""
        return self.at_step >= 0


def _check_actors(section, name: str) -> None:
    """The Ray Data actor resources every stage section has, in one shape: ``actor_cpus`` > 0,
    ``actor_gpus`` a share of one GPU (0..1) or whole GPUs, ``max_actors`` >= 0 (0 = no limit)."""
    _check(section.actor_cpus > 0, f"{name}.actor_cpus", "must be > 0")
    gpus = section.actor_gpus
    _check(gpus >= 0 and (gpus <= 1 or float(gpus).is_integer()), f"{name}.actor_gpus",
           f"must be a share of one GPU in [0, 1] (0 = CPU) or a whole number of GPUs, got {gpus}")
    _check(section.max_actors >= 0, f"{name}.max_actors", "must be >= 0 (0 = grow with the cluster)")


@dataclass(frozen=True)
class InferenceConfig:
    # Multi-scale inference (SIPE/IRN): scales, each with its horizontal flip.
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    # Which map gives the seeds: the classifier CAM or the prototype-aware CAM (Eq. 13).
    cam_source: str = "cam"
    # Background threshold sweep for seed mIoU; fixed_threshold >= 0 evaluates just that one.
    # Wider than the customary 0.00-0.60 so that an optimum is not cut off (a best threshold at
    # either end of the range is flagged in the reports).
    threshold_start: float = 0.0
    threshold_stop: float = 0.95
    threshold_step: float = 0.01
    fixed_threshold: float = -1.0
    # dtype of the CAMs saved in .npz files.
    save_dtype: str = "float16"
    # Ray Data CAM actors (make_cams, pseudo_labels): CPUs each, the share of one GPU each (0 = on
    # the CPU; 0.25 = four actors per GPU) and the most actors (0 = grow with the cluster).
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    max_actors: int = 0

    def __post_init__(self):
        _validate("inference", self, _scales(), _one_of("cam_source", CAM_SOURCES))
        _check(0 <= self.threshold_start <= self.threshold_stop <= 1, "inference.threshold_start/stop",
               "must satisfy 0 <= start <= stop <= 1")
        _validate("inference", self, _positive("threshold_step"),
                  ("fixed_threshold", lambda v: v < 0 or v <= 1, "must be <= 1 (or < 0 = sweep)"),
                  ("save_dtype", lambda v: v in ("float16", "float32"), "must be float16 or float32"))
        _check_actors(self, "inference")


@dataclass(frozen=True)
class PseudoLabelConfig:
    # "irn": confident fg/bg each refined by DenseCRF, disagreement -> 255; "crf_argmax": CRF-refined seeds.
    mode: str = "irn"
    # Named thresholds ("irn" 0.30/0.05, "amn" 0.45/0.15) or "custom" to use conf_fg/conf_bg.
    preset: str = "irn"
    conf_fg: float = 0.30
    conf_bg: float = 0.05
    # Background threshold for crf_argmax mode.
    bg_threshold: float = 0.15
    # DenseCRF parameters (IRN).
    gt_prob: float = 0.7
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    crf_iters: int = 10
    # Ray Data CRF actors: CPUs each, GPU share each (0: the CRF runs on the CPU), the most actors.
    actor_cpus: float = 0.5
    actor_gpus: float = 0.0
    max_actors: int = 0

    def __post_init__(self):
        _validate("pseudo", self, _one_of("mode", PSEUDO_MODES), _one_of("preset", (*PSEUDO_PRESETS, "custom")))
        _check(0 <= self.conf_bg < self.conf_fg <= 1, "pseudo.conf_fg/conf_bg", "must satisfy 0 <= conf_bg < conf_fg <= 1")
        _validate("pseudo", self, ("gt_prob", lambda v: 0 < v < 1, "must be in (0, 1)"), _at_least("crf_iters", 1))
        _check_actors(self, "pseudo")

    @property
    def thresholds(self) -> tuple[float, float]:
        """(conf_fg, conf_bg) after applying the preset."""
        return PSEUDO_PRESETS.get(self.preset, (self.conf_fg, self.conf_bg))


@dataclass(frozen=True)
class AffinityConfig:
    # Refine stage 1 (IRN, Ahn et al. CVPR 2019): a boundary network trained on the confident CRF
    # seeds, then a random walk of the CAMs over its affinities. Folder of the seed PNGs
    # (workflows.pseudo_labels output, 255 = unknown) and of the CAM files the walk propagates;
    # "" = what the pipeline made (<run>/pseudo-labels-train and its cams/).
    seeds_dir: str = ""
    cam_dir: str = ""
    # Training (IRN's train_irn.py defaults: 3 epochs, batch 32, lr 0.1, wd 1e-4, crop 512, long
    # side 320-640); the backbone is frozen as in IRN, only the boundary branch learns.
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.1
    crop_size: int = 512
    resize_long: tuple[int, int] = (320, 640)
    # Pixel pairs within this radius get affinity labels during training (IRN: 10).
    radius: int = 10
    # Random walk (IRN's make_sem_seg_labels.py): pairs within walk_radius (5), affinity exponent
    # beta (10), 2^exp_times steps (8), constant background score bg_threshold (0.25); mode
    # "average" is IRN's operator, "mass" the mass-conserving one (cpal_ray.refine.affinity).
    walk_radius: int = 5
    beta: float = 10.0
    exp_times: int = 8
    bg_threshold: float = 0.25
    walk_mode: str = "average"
    # Boundary map = mean of the image's and its mirror's (IRN's EdgeDisplacement does this).
    flip: bool = True
    # Ray Data mask actors: CPUs each, GPU share each (0 = CPU), the most actors (0 = grow with the cluster).
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    max_actors: int = 0
    # The images the pipeline scores seeds, CRF seeds and masks on (Table 4: VOC 2012 train, a
    # subset of train_aug): a split as data.* names them ("train" = data.train_split), an id-list
    # name or a .txt path; "" = the training split the masks are made for.
    score_split: str = ""

    def __post_init__(self):
        _validate("affinity", self, *_stage_training_rules())
        _check(self.radius >= 2 and self.walk_radius >= 2, "affinity.radius/walk_radius", "must be >= 2")
        _validate("affinity", self, _positive("beta"),
                  ("exp_times", lambda v: 0 <= v <= 12, "must be in [0, 12], got {v}"),
                  ("bg_threshold", lambda v: 0 <= v <= 1, "must be in [0, 1]"), _one_of("walk_mode", WALK_MODES))
        _check_actors(self, "affinity")


@dataclass(frozen=True)
class SegConfig:
    # Refine stage 2: a segmentation network trained on the pseudo masks (255 ignored). Folder of
    # the mask PNGs; "" = what the pipeline made (<run>/masks-train).
    masks_dir: str = ""
    # The network: a registered backbone at output stride 16 with torchvision's DeepLabV3 head
    # (ASPP, "deeplabv3") or its Lite R-ASPP head ("lraspp", also fed the stride-8 stage; ~1/20
    # of ASPP's compute, the CPU choice). backbone "" = model.backbone (the paper's segmenter is
    # ResNet-101: "resnet101"); weights: its ImageNet weights file ("" = model.weights when the
    # backbone is model.backbone; model.pretrained applies).
    head: str = "deeplabv3"
    backbone: str = ""
    weights: str = ""
    # Training (cpal-ray's choice, DeepLab-style: SGD momentum 0.9, poly, new layers x10).
    epochs: int = 30
    batch_size: int = 16
    lr: float = 0.01
    crop_size: int = 512
    resize_long: tuple[int, int] = (320, 640)
    # Evaluation / prediction: scales (each with its flip when flip is true) and DenseCRF
    # post-processing of the softmax with the pseudo.* CRF parameters.
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    crf: bool = False
    # The split the pipeline scores the segmenter on (Table 5: VOC 2012 val): "val" =
    # data.val_split, or an id-list name or a .txt path (the paper config's data.val_split is
    # VOC train, where seeds are scored, so it names val.txt).
    eval_split: str = "val"
    # Ray Data prediction actors: CPUs each, GPU share each (0 = CPU), the most actors (0 = grow with the cluster).
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    max_actors: int = 0

    def __post_init__(self):
        _check(self.head in ("deeplabv3", "lraspp"), "seg.head", f"must be 'deeplabv3' or 'lraspp', got {self.head!r}")
        if self.backbone:
            from cpal_ray.models import list_backbones

            _check(self.backbone in list_backbones(), "seg.backbone",
                   f"unknown backbone {self.backbone!r}; choose from {list_backbones()}")
        _validate("seg", self, *_stage_training_rules(), _scales())
        _check_actors(self, "seg")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cpal: CPALConfig = field(default_factory=CPALConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def __post_init__(self):
        t = self.training
        _check(t.batch_size % self.dist.num_workers == 0, t.field("batch_size"),
               f"global batch {t.batch_size} must be divisible by dist.num_workers={self.dist.num_workers}")
        _check(self.cpal.bank_shards <= self.bank_classes, "cpal.bank_shards",
               f"must be <= the bank's {self.bank_classes} classes (one class per shard at most), "
               f"got {self.cpal.bank_shards}")

    @property
    def bank_classes(self) -> int:
        """Rows of the support bank: the N foreground classes, and the background as row N when
        ``cpal.background = prototype``."""
        return self.data.num_classes + (self.cpal.background == "prototype")

    @property
    def training(self) -> "StageTraining":
        """What a training run of ``train.task`` trains with, each setting read from its one field:
        the CAM network's from ``train``/``optim``/``data``/``cpal``; a refine stage's from its own
        section (``affinity.epochs``, ``seg.lr``...), with the stage's fixed choices: no diagnostics,
        no bank, new layers at x1 (IRN trains only its new branch, the backbone frozen) or x10 (the
        segmenter's head, DeepLab's, whatever multiplier the CAM run used)."""
        task = self.train.task
        if task == "cam":
            return StageTraining(task, self.train.epochs, self.train.batch_size, self.optim.lr,
                                 self.optim.new_layer_lr_mult, self.data.crop_size, tuple(self.data.resize_long),
                                 self.train.diag_images, self.cpal.uses_bank)
        stage = self.affinity if task == "affinity" else self.seg
        return StageTraining(task, stage.epochs, stage.batch_size, stage.lr, 1.0 if task == "affinity" else 10.0,
                             stage.crop_size, tuple(stage.resize_long), 0, False)

    def for_task(self, task: str, name: str | None = None) -> "Config":
        """This config as the training run of ``task`` (``train.task`` set; the settings it trains
        with are then ``training``'s), named ``name``, else ``<train.name>-<task>`` (a name that
        already ends so is kept). ``task="cam"`` returns the config unchanged."""
        _check(task in TASKS, "train.task", f"must be one of {TASKS}, got {task!r}")
        if task == "cam":
            return self
        base = self.train.name
        return self.replace(**{"train.task": task,
                               "train.name": name or (base if base.endswith(f"-{task}") else f"{base}-{task}")})

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted keys changed, e.g. ``cfg.replace(**{"cpal.tau": 0.2})``."""
        return from_dict(_apply_overrides(self.to_dict(), dotted))


@dataclass(frozen=True)
class StageTraining:
    """The settings one training run trains with (``Config.training``)."""
    task: str
    epochs: int
    batch_size: int
    lr: float
    new_layer_lr_mult: float
    crop_size: int
    resize_long: tuple[int, int]
    diag_images: int
    uses_bank: bool

    def field(self, setting: str) -> str:
        """The dotted field a setting is read from: ``field("epochs")`` is ``train.epochs`` for the
        CAM run, ``affinity.epochs`` for the affinity stage."""
        return CAM_TRAINING_FIELDS[setting] if self.task == "cam" else f"{self.task}.{setting}"


# Where the CAM run reads each setting of ``StageTraining`` a refine stage reads from its own section.
CAM_TRAINING_FIELDS = {"epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr",
                       "crop_size": "data.crop_size", "resize_long": "data.resize_long"}
# The CAM run's settings a refine stage fixes itself.
CAM_ONLY_FIELDS = ("optim.new_layer_lr_mult", "train.diag_images", "cpal.enabled")


def check_stage_overrides(task: str, overrides: dict[str, Any]) -> None:
    """ConfigError for an override of a field the training run of ``task`` does not read (a refine
    stage trains from its own section): ``train.epochs`` for the affinity stage names ``affinity.epochs``."""
    if task == "cam":
        return
    for key in overrides:
        setting = next((s for s, f in CAM_TRAINING_FIELDS.items() if f == key), None)
        if setting is not None:
            _check(False, key, f"the {task} stage trains {task}.{setting}; set that")
        _check(key not in CAM_ONLY_FIELDS, key, f"the {task} stage does not read it (the CAM run's setting)")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Convert a YAML value to the field's declared type, or raise naming the field."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        args = typing.get_args(typ)
        _check(isinstance(value, (list, tuple)), name, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        _check(len(value) == len(args), name, f"must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if typ is bool:
        _check(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        return value
    if typ is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
        return value
    if typ is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, f"must be a number, got {value!r}")
        return float(value)
    if typ is str:
        _check(isinstance(value, str), name, f"must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    _check(isinstance(values, dict), prefix or "config", f"must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        _check(False, f"{prefix}{unknown[0]}", f"unknown field; {hint}known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        full = f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, full + ".")
        else:
            kwargs[name] = _coerce(value, typ, full)
    return cls(**kwargs)


# The Ray Data actors' resources before they had one shape: old dotted name -> new. A config
# (a user's YAML, a run's saved config.yaml, an override) that uses an old name still loads, with
# a warning naming both. inference.use_gpu / cam_actors_per_gpu became the GPU share of the CAM,
# mask and prediction actors (they all took 1 / cam_actors_per_gpu of a GPU with use_gpu).
RENAMED = {"inference.cam_cpus": "inference.actor_cpus", "inference.max_cam_actors": "inference.max_actors",
           "pseudo.cpus_per_task": "pseudo.actor_cpus", "pseudo.max_crf_actors": "pseudo.max_actors",
           "affinity.cpus_per_task": "affinity.actor_cpus", "seg.cpus_per_task": "seg.actor_cpus",
           "inference.use_gpu": "inference/affinity/seg.actor_gpus",
           "inference.cam_actors_per_gpu": "inference/affinity/seg.actor_gpus"}
GPU_SHARE_SECTIONS = ("inference", "affinity", "seg")
_RENAMES_TOLD: set[str] = set()  # the renames this process has warned about


def _renamed(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the old names of ``RENAMED`` moved to the new ones (an old name wins over a
    new one given beside it: only an override or an old file still writes it)."""
    values = _to_plain(values)
    if not isinstance(values, dict):
        return values
    found = []
    for old, new in RENAMED.items():
        section, name = old.split(".")
        if isinstance(values.get(section), dict) and name in values[section]:
            found.append(f"{old} is now {new}")
            if not new.startswith(f"{section}/"):
                values[section][new.split(".")[1]] = values[section].pop(name)
    if set(found) - _RENAMES_TOLD:
        # Once per process: every load of an older run's saved config.yaml (resume, a sweep's
        # trials, each worker) would otherwise repeat it.
        _RENAMES_TOLD.update(found)
        log.warning("config: %s (read as the new names here; rename them in your YAML or overrides; "
                    "a saved config.yaml of an older run needs nothing)", "; ".join(found))
    dist = values.get("dist")
    if isinstance(dist, dict) and any(k in dist for k in ("crash_rank", "crash_step", "crash_wait_s")):
        # dist.crash_* (test-only fault injection) became the faults section; a saved config of an
        # older run has them at their "off" values, which need no section at all.
        rank, step, wait = dist.pop("crash_rank", -1), dist.pop("crash_step", -1), dist.pop("crash_wait_s", 0.0)
        if rank != -1 and step != -1:
            log.warning("config: dist.crash_* is now the faults section (read as it here; rename it)")
            values["faults"] = {"target": "bank" if rank == -2 else "worker", "kill_rank": max(rank, 0),
                                "at_step": step, "wait_s": wait}
    inference = values.get("inference")
    if isinstance(inference, dict) and ("use_gpu" in inference or "cam_actors_per_gpu" in inference):
        on = inference.pop("use_gpu", None)
        per_gpu = inference.pop("cam_actors_per_gpu", None)
        _check(on is None or isinstance(on, bool), "inference.use_gpu", f"must be true or false, got {on!r}")
        _check(per_gpu is None or (isinstance(per_gpu, int) and not isinstance(per_gpu, bool) and per_gpu >= 1),
               "inference.cam_actors_per_gpu", f"must be an integer >= 1, got {per_gpu!r}")
        current = inference.get("actor_gpus", 0.0)
        on = bool(current) if on is None else on
        share = 1.0 / per_gpu if per_gpu is not None else (current or 1.0)
        for section in GPU_SHARE_SECTIONS:
            values.setdefault(section, {})
            if isinstance(values[section], dict):
                values[section]["actor_gpus"] = share if on else 0.0
    return values


def from_dict(values: dict[str, Any]) -> Config:
    """Build a validated Config from a nested dict (missing fields take defaults; the old names
    of ``RENAMED`` are read as the new ones, with a warning)."""
    return _build(Config, _renamed(values or {}), "")


def _apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = _to_plain(values)
    for key, value in overrides.items():
        parts = key.split(".")
        _check(len(parts) == 2, key, "overrides take the form section.field=value")
        out.setdefault(parts[0], {})
        _check(isinstance(out[parts[0]], dict), parts[0], "must be a mapping")
        out[parts[0]][parts[1]] = value
    return out


def _field_type(key: str) -> Any:
    """The declared type of a dotted field (``train.name`` -> str); None for an unknown one."""
    section, _, name = key.partition(".")
    cls = typing.get_type_hints(Config).get(section)
    return typing.get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["cpal.tau=0.2", "model.backbone=tiny"]`` -> {"cpal.tau": 0.2, ...} (values parsed as YAML).

    A text field stays the text typed: ``train.name=001`` is "001", ``train.name=yes`` is "yes"
    (YAML alone would make them 1 and True)."""
    parsed = {}
    for item in items:
        _check("=" in item, item, "an override must look like section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            if _field_type(key) is not str:
                raise ConfigError(f"override {item}: not a YAML value ({str(e).splitlines()[0]})", field=key) from None
            value = raw.strip()
        if _field_type(key) is str and value is not None and not isinstance(value, (str, list, dict)):
            value = raw.strip()
        parsed[key] = value
    return parsed


def _override_of(field: str, overrides: dict[str, Any]) -> str | None:
    """The override that set ``field`` or a field below it (an unknown section: ``cpall.tau``)."""
    return field if field in overrides else next((k for k in overrides if k.startswith(f"{field}.")), None)


def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package (``cpal_ray/configs/<name>.yaml``)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def config_file(path):
    """The ``Location`` of a config: ``path`` itself when it exists (a local path or a URI), else
    the shipped config it names — ``configs/<name>.yaml``, ``<name>.yaml`` or ``<name>`` — found in
    the installed package, so a shipped config loads from any directory."""
    from cpal_ray.storage import is_uri, location

    loc = location(path)
    if loc.is_file():
        return loc
    text = str(path)
    if not is_uri(text) and Path(text).parent in (Path("."), Path("configs")):
        shipped = SHIPPED_CONFIGS / (Path(text).stem + ".yaml")
        if shipped.is_file():
            return location(shipped)
    raise ConfigError(f"{text}: config file not found (shipped configs: {', '.join(shipped_configs())})")


def load_config(path=None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load YAML (or defaults when ``path`` is None), apply dotted overrides, validate.

    path: a local path, a URI (``s3://…/config.yaml``), a ``cpal_ray.storage.Location`` or a
    shipped config's name (``config_file``). An invalid value raises ``ConfigError`` naming the
    field and where it came from: the override that set it, else the file.
    """
    values: dict[str, Any] = {}
    source = None
    if path is not None:
        source = config_file(path)
        try:
            values = _yaml(source.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    try:
        cfg = from_dict(_apply_overrides(values, overrides))
        check_stage_overrides(cfg.train.task, overrides)
        return cfg
    except ConfigError as e:
        if (key := _override_of(e.field, overrides)) is not None:
            raise ConfigError(f"override {key}={overrides[key]}: {e}", e.field) from None
        raise ConfigError(f"{source}: {e}" if source is not None else str(e), e.field) from None


def config_yaml(cfg: Config) -> str:
    """The YAML text ``save_config`` writes."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path):
    """Write the resolved config as YAML to a local path or URI (atomically); returns its Location."""
    from cpal_ray.storage import location

    return location(path).write_text(config_yaml(cfg))
