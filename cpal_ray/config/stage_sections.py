"""The sections of the stages after the CAM run: inference (CAMs and seeds), pseudo (CRF seeds and
masks), affinity (IRN's boundary network and random walk) and seg (the segmenter); each holds its
Ray Data actors' resources in one shape and, for the refine stages, its own training fields."""
from __future__ import annotations

from dataclasses import dataclass

from cpal_ray.config.rules import (CAM_SOURCES, PSEUDO_MODES, PSEUDO_PRESETS, WALK_MODES, _at_least, _check,
                                   _long_side_range, _one_of, _positive, Rule, _scales, _validate)


def _stage_training_rules() -> tuple[Rule, ...]:
    """The rules of the training fields a refine stage's section holds (affinity.*, seg.*)."""
    return (_at_least("epochs", 1), _at_least("batch_size", 1), _positive("lr"), _at_least("crop_size", 16),
            _long_side_range())


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
