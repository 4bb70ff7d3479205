"""The two networks after the CAMs: IRN's boundary network (affinities) and a DeepLab segmenter.

Both sit on a registered backbone (``cpal_ray.models.registry``), so the paper's ResNet-50 and
the CPU's EfficientNet-Lite0 plug in the same way as for the CAM network.

- ``EdgeNet`` (IRN, Ahn et al. CVPR 2019, ``net/resnet50_irn.py``'s edge branch): the backbone is
  frozen and run without gradients (IRN detaches every stage); each stage's features go through
  a 1x1 conv to 32 channels, GroupNorm(4) and ReLU, are resized to output stride 4 and
  concatenated; a 1x1 conv with bias gives one boundary logit per pixel. IRN's displacement
  branch (instance segmentation) is not built.
- ``SegNet``: the backbone at output stride 16 + torchvision's ``DeepLabHead`` (ASPP, rates
  12/24/36, 256 channels) -> N + 1 class logits, bilinearly resized to the input: DeepLabV3 on
  any registered backbone (with ResNet-50 it is torchvision's deeplabv3_resnet50 at OS 16).

Stage features: ``stage_features(backbone, x)`` returns the outputs of the modules named in
``STAGES[type(backbone).__name__]`` (strides 4, 4 or 8, ..., 16) and the backbone's own output,
captured with forward hooks, so no backbone code is repeated here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.lraspp import LRASPPHead

# Per backbone class: the submodules whose outputs feed the boundary branch (the backbone's
# final output is always added). ResNet50: IRN's stages 1-4 (64, 256, 512, 1024 channels at
# strides 4, 4, 8, 16); EfficientNet-Lite0: the last block of each resolution (24 ch at stride
# 4, 40 at 8, 112 at 16); TinyCNN: its blocks at strides 4, 8, 16.
STAGES = {
    "ResNet50": ("maxpool", "layer1", "layer2", "layer3"),
    "ResNet101": ("maxpool", "layer1", "layer2", "layer3"),
    "EfficientNetLite0": ("net._blocks.2", "net._blocks.4", "net._blocks.10"),
    "TinyCNN": ("body.1", "body.2", "body.3"),
}
EDGE_WIDTH = 32  # IRN: every stage reduced to 32 channels
EDGE_STRIDE = 4  # IRN: the boundary map is at output stride 4


def stage_features(backbone: nn.Module, x: Tensor) -> list[Tensor]:
    """Features of every stage of ``backbone`` for x (B, 3, H, W), strides rising, its output last."""
    names = STAGES.get(type(backbone).__name__)
    if names is None:
        raise ValueError(f"backbone {type(backbone).__name__} has no stage list in affinity_seg_nets.STAGES")
    modules = dict(backbone.named_modules())
    captured: list[Tensor] = []
    handles = [modules[n].register_forward_hook(lambda _m, _i, out: captured.append(out)) for n in names]
    try:
        out = backbone(x)
    finally:
        for h in handles:
            h.remove()
    return [*captured, out]


def _freeze_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


class EdgeNet(nn.Module):
    """IRN's boundary network. x (B, 3, H, W) -> {"boundary_logits": (B, ceil(H/4), ceil(W/4))};
    the boundary map is their sigmoid. The backbone is frozen (no gradients, eval mode always)."""

    def __init__(self, backbone: nn.Module, width: int = EDGE_WIDTH):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            channels = [f.shape[1] for f in stage_features(backbone.eval(), torch.zeros(1, 3, 64, 64))]
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.GroupNorm(4, width), nn.ReLU(inplace=True))
            for c in channels)
        self.fuse = nn.Conv2d(width * len(channels), 1, 1, bias=True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "EdgeNet":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = (math.ceil(x.shape[-2] / EDGE_STRIDE), math.ceil(x.shape[-1] / EDGE_STRIDE))
        with torch.no_grad():
            feats = stage_features(self.backbone, x)
        maps = [F.interpolate(b(f), size=size, mode="bilinear", align_corners=False) for b, f in zip(self.branches, feats)]
        return {"boundary_logits": self.fuse(torch.cat(maps, dim=1))[:, 0]}

    def param_groups(self, new_layer_lr_mult: float = 1.0) -> list[dict]:
        """Only the boundary branch learns (IRN): one group at lr x ``new_layer_lr_mult``."""
        params = [p for m in (self.branches, self.fuse) for p in m.parameters()]
        return [{"name": "new_layers", "params": params, "lr_mult": float(new_layer_lr_mult)}]


SEG_HEADS = ("deeplabv3", "lraspp")


class SegNet(nn.Module):
    """A segmentation head on a registered backbone. x (B, 3, H, W) -> {"logits": (B, classes, H, W)}.

    head "deeplabv3": torchvision's ``DeepLabHead`` (ASPP, rates 12/24/36, 256 channels) on the
    output-stride-16 features; "lraspp": torchvision's ``LRASPPHead`` (Lite R-ASPP, 128 channels)
    on those features and the stride-8 stage (``stage_features``): about 1/20 of ASPP's compute
    on a 1280-channel backbone, the CPU choice. classes = N + 1 (background first). ``freeze_bn``
    keeps the backbone's BatchNorms in eval mode with frozen affine parameters (as the CAM network
    does); the head's BatchNorms train, so a training batch needs at least 2 images per worker.
    """

    def __init__(self, backbone: nn.Module, classes: int, freeze_bn: bool = True, head: str = "deeplabv3"):
        super().__init__()
        if head not in SEG_HEADS:
            raise ValueError(f"unknown segmentation head {head!r}; choose from {SEG_HEADS}")
        self.backbone, self.head_name = backbone, head
        if head == "lraspp":
            with torch.no_grad():
                feats = stage_features(backbone.eval(), torch.zeros(1, 3, 64, 64))
            self.low_index = next(i for i, f in enumerate(feats) if f.shape[-1] == 8)  # the stride-8 stage
            self.head = LRASPPHead(feats[self.low_index].shape[1], int(backbone.out_channels), int(classes), 128)
        else:
            self.head = DeepLabHead(int(backbone.out_channels), int(classes))
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "SegNet":
        super().train(mode)
        if self.freeze_bn:
            _freeze_norms(self.backbone)
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.head_name == "lraspp":
            feats = stage_features(self.backbone, x)
            logits = self.head({"low": feats[self.low_index], "high": feats[-1]})
        else:
            logits = self.head(self.backbone(x))
        return {"logits": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}

    def param_groups(self, new_layer_lr_mult: float = 10.0) -> list[dict]:
        """Backbone at the base lr, the head at lr x ``new_layer_lr_mult`` (DeepLab's x10)."""
        return [{"name": "backbone", "params": [p for p in self.backbone.parameters() if p.requires_grad],
                 "lr_mult": 1.0},
                {"name": "new_layers", "params": list(self.head.parameters()), "lr_mult": float(new_layer_lr_mult)}]
