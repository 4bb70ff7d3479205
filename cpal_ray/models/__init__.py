"""Models: the backbone registry, CAMNet, and weight files.

    from cpal_ray.models import build_model
    model = build_model(cfg.model, num_classes=cfg.data.num_classes)
    out = model(images)   # {"features", "cams", "logits", "z"}, see CAMNet.forward
"""
from __future__ import annotations

import dataclasses

from . import backbones  # noqa: F401  (registers resnet50/101, efficientnet_lite0, tiny)
from .cam_net import SIDE_WIDTHS, CAMNet, projection_head
from .affinity_seg_nets import EdgeNet, SegNet
from .registry import backbone_channels, build_backbone, list_backbones, register_backbone
from .weights import export_weights, load_weights, read_state_dict

__all__ = ["CAMNet", "EdgeNet", "SegNet", "backbone_channels", "build_backbone", "build_model", "build_task_model", "embed_dim", "export_weights",
           "list_backbones", "load_weights", "projection_head", "read_state_dict", "register_backbone", "unwrap"]


def _backbone_kwargs(model_cfg) -> dict:
    kwargs = {"pretrained": model_cfg.pretrained, "weights": model_cfg.weights}
    if model_cfg.backbone == "tiny":
        kwargs["width"] = model_cfg.tiny_width
    return kwargs


def build_model(model_cfg, num_classes: int) -> CAMNet:
    """CAMNet for a ``ModelConfig``: backbone ``model_cfg.backbone`` (with ``pretrained`` and
    ``weights``; ``tiny_width`` for the tiny net), ``embedding`` (projection dim ``proj_dim``), ``freeze_bn``."""
    backbone = build_backbone(model_cfg.backbone, **_backbone_kwargs(model_cfg))
    return CAMNet(backbone, num_classes, proj_dim=model_cfg.proj_dim, freeze_bn=model_cfg.freeze_bn,
                  embedding=model_cfg.embedding)


def build_task_model(cfg):
    """The network a ``Config`` trains (``train.task``): CAMNet ("cam"), the IRN boundary network
    ("affinity", backbone frozen) or the DeepLabV3 segmenter ("seg", N + 1 classes), each on
    ``model.backbone`` with its ``pretrained`` / ``weights`` (the segmenter on ``seg.backbone`` /
    ``seg.weights`` when set)."""
    task = cfg.train.task
    if task == "cam":
        return build_model(cfg.model, cfg.data.num_classes)
    model_cfg = cfg.model
    if task == "seg" and cfg.seg.backbone and cfg.seg.backbone != model_cfg.backbone:
        model_cfg = dataclasses.replace(model_cfg, backbone=cfg.seg.backbone, weights=cfg.seg.weights)
    elif task == "seg" and cfg.seg.weights:
        model_cfg = dataclasses.replace(model_cfg, weights=cfg.seg.weights)
    backbone = build_backbone(model_cfg.backbone, **_backbone_kwargs(model_cfg))
    if task == "affinity":
        return EdgeNet(backbone)
    return SegNet(backbone, cfg.data.num_classes + 1, freeze_bn=model_cfg.freeze_bn, head=cfg.seg.head)


def embed_dim(model_cfg) -> int:
    """D of z (and of the bank's prototypes) for a ``ModelConfig``, without building the model:
    ``proj_dim``, or the backbone's channels C when ``proj_dim == 0``; 768 for SIPE's hierarchical
    embedding."""
    if model_cfg.embedding == "hierarchical":
        return sum(SIDE_WIDTHS)
    return model_cfg.proj_dim or backbone_channels(model_cfg.backbone, **_backbone_kwargs(model_cfg))


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if hasattr(model, "module") else model
