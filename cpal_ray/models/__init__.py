"""Models: the backbone registry, CAMNet, and weight files.

    from cpal_ray.models import build_model
    model = build_model(cfg.model, num_classes=cfg.data.num_classes)
    out = model(images)   # {"features", "cams", "logits", "z"}, see CAMNet.forward
"""
from __future__ import annotations

from . import backbones  # noqa: F401  (registers resnet50, efficientnet_lite0, tiny)
from .cam_net import CAMNet, projection_head
from .registry import build_backbone, list_backbones, register_backbone
from .weights import export_weights, load_weights, read_state_dict

__all__ = ["CAMNet", "build_backbone", "build_model", "export_weights", "list_backbones",
           "load_weights", "projection_head", "read_state_dict", "register_backbone"]


def build_model(model_cfg, num_classes: int) -> CAMNet:
    """CAMNet for a ``ModelConfig``: backbone ``model_cfg.backbone`` (with ``pretrained`` and
    ``weights``; ``tiny_width`` for the tiny net), projection dim ``proj_dim``, ``freeze_bn``."""
    kwargs = {"pretrained": model_cfg.pretrained, "weights": model_cfg.weights}
    if model_cfg.backbone == "tiny":
        kwargs["width"] = model_cfg.tiny_width
    backbone = build_backbone(model_cfg.backbone, **kwargs)
    return CAMNet(backbone, num_classes, proj_dim=model_cfg.proj_dim, freeze_bn=model_cfg.freeze_bn)
