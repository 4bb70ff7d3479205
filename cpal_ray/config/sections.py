"""The sections a CAM training run reads: data, model, cpal, optim, train, dist, faults."""
from __future__ import annotations

from dataclasses import dataclass

from cpal_ray.config.rules import (BACKGROUNDS, BUNDLED_VOC_MINI, CENTERS, CONTEXTS, DATASETS, EMBEDDINGS,
                                   METRICS, REGIONS, SELF_GRADS, TASKS, _at_least, _check, check_run_name,
                                   _long_side_range, _one_of, _positive, _validate)


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
