"""CAMNet: backbone + 1×1 classifier (class activation maps) + the pixel embedding z of CPAL.

The classifier is a bias-free 1×1 conv, so GAP followed by the classifier equals the spatial
mean of the raw CAMs: ``logits = cams(f).mean((2, 3))`` is both the classification score of the
BCE loss and consistent with the maps the CPAL losses use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .affinity_seg_nets import stage_features

# Hidden width of the projection head: min(C, PROJ_HIDDEN).
PROJ_HIDDEN = 256
# SIPE's side convs: output widths for the last four backbone stages (ResNet-50's layer1-4:
# 256 -> 128, 512 -> 128, 1024 -> 256, 2048 -> 256), so D = 768.
SIDE_WIDTHS = (128, 128, 256, 256)
# SIPE's epsilon of the per-pixel L2 normalisation of each side output.
SIDE_EPS = 1e-5


def projection_head(in_channels: int, proj_dim: int) -> nn.Module:
    """v(.) of Eq. 4: 1×1 conv C -> min(C, 256) -> ReLU -> 1×1 conv -> D; identity when D == 0.

    (B, C, h, w) -> (B, D, h, w), or (B, C, h, w) unchanged when ``proj_dim == 0``.
    """
    if proj_dim == 0:
        return nn.Identity()
    hidden = min(in_channels, PROJ_HIDDEN)
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, proj_dim, 1))


class HierarchicalEmbedding(nn.Module):
    """SIPE's "hierarchical feature": z = concat_s resize(side_s(stage_s.detach()) / ||.||).

    One bias-free 1×1 conv per stage (widths ``SIDE_WIDTHS``) on the *detached* stage output, so
    neither L_self nor anything else reaches the backbone through z; each output L2-normalised
    per pixel (+1e-5), bilinearly resized to the grid of the last stage (output stride 16) and
    concatenated. D = sum(SIDE_WIDTHS) = 768.

    stages: the 4 stage outputs [(B, C_s, h_s, w_s)], strides rising, the last at the CAM's grid
    -> z (B, 768, h, w).
    """

    def __init__(self, in_channels: list[int]):
        super().__init__()
        if len(in_channels) != len(SIDE_WIDTHS):
            raise ValueError(f"hierarchical embedding needs {len(SIDE_WIDTHS)} stages, got {len(in_channels)}")
        self.sides = nn.ModuleList(nn.Conv2d(c, w, 1, bias=False) for c, w in zip(in_channels, SIDE_WIDTHS))
        self.out_channels = sum(SIDE_WIDTHS)

    def forward(self, stages: list[Tensor]) -> Tensor:
        size = stages[-1].shape[-2:]
        parts = []
        for side, x in zip(self.sides, stages):
            y = side(x.detach())
            y = y / (y.norm(dim=1, keepdim=True) + SIDE_EPS)
            parts.append(y if y.shape[-2:] == size else F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return torch.cat(parts, dim=1)


def stage_channels(backbone: nn.Module, size: int = 64) -> list[int]:
    """Channels of the last ``len(SIDE_WIDTHS)`` stages of ``stage_features`` (one dry forward of
    a size x size image without gradients, the backbone's train/eval flag restored)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            p = next(backbone.parameters(), None)
            x = torch.zeros(1, 3, size, size, dtype=p.dtype if p is not None else torch.float32,
                            device=p.device if p is not None else "cpu")
            return [t.shape[1] for t in stage_features(backbone, x)[-len(SIDE_WIDTHS):]]
    finally:
        backbone.train(was_training)


class CAMNet(nn.Module):
    """The network CPAL trains: features f, raw CAMs w_nᵀf, image logits and projections z.

    Args:
        backbone: module with ``out_channels`` (C) mapping (B, 3, H, W) -> (B, C, h, w), OS 16.
        num_classes: foreground classes N (background has no classifier row).
        proj_dim: projection dim D of v(.); 0 = identity, z = f (D = C) (``embedding="head"``).
        embedding: "head" (z = v(f)) or "hierarchical" (SIPE's side convs on the detached stages,
            ``HierarchicalEmbedding``; D = 768, proj_dim unused).
        freeze_bn: keep every BatchNorm of the backbone in eval mode (running statistics fixed,
            also under ``model.train()``) and its affine parameters frozen (requires_grad False),
            as SIPE does; those parameters then appear in no optimiser group.

    The classifier is ``nn.Conv2d(C, N, 1, bias=False)`` initialised with Xavier-uniform
    (bound sqrt(6 / (C + N)), so initial CAMs are small and of either sign); the projection convs
    keep PyTorch's default (Kaiming-uniform) initialisation.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, proj_dim: int = 128,
                 freeze_bn: bool = True, embedding: str = "head"):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if proj_dim < 0:
            raise ValueError(f"proj_dim must be >= 0, got {proj_dim}")
        channels = getattr(backbone, "out_channels", None)
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"backbone {type(backbone).__name__} has no integer out_channels attribute")
        self.backbone = backbone
        self.num_classes = num_classes
        self.in_channels = channels
        self.proj_dim = proj_dim
        self.embedding = embedding
        self.freeze_bn = freeze_bn
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        if embedding == "head":
            self.projection = projection_head(channels, proj_dim)
            self.embed_dim = proj_dim or channels  # D of z
        elif embedding == "hierarchical":
            self.projection = HierarchicalEmbedding(stage_channels(backbone))
            self.embed_dim = self.projection.out_channels
        else:
            raise ValueError(f"unknown embedding {embedding!r}; choose 'head' or 'hierarchical'")
        if freeze_bn:
            for m in self._backbone_norms():
                for p in m.parameters():
                    p.requires_grad_(False)
            self.train(self.training)

    def _backbone_norms(self) -> list[_BatchNorm]:
        return [m for m in self.backbone.modules() if isinstance(m, _BatchNorm)]

    def train(self, mode: bool = True) -> "CAMNet":
        """As ``nn.Module.train``, but frozen backbone BatchNorms always stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for m in self._backbone_norms():
                m.eval()
        return self

    def forward_features(self, x: Tensor) -> Tensor:
        """Backbone features. x (B, 3, H, W) -> f (B, C, h, w), h = ceil(H / 16)."""
        return self.backbone(x)

    def cams(self, f: Tensor) -> Tensor:
        """Raw class activation maps w_nᵀf (before any ReLU). f (B, C, h, w) -> (B, N, h, w)."""
        return self.classifier(f)

    def project(self, f: Tensor) -> Tensor:
        """Projection v(f) of Eq. 4. f (B, C, h, w) -> z (B, D, h, w); z = f when proj_dim == 0."""
        return self.projection(f)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, 3, H, W) -> {"features": f (B, C, h, w), "cams": raw (B, N, h, w),
        "logits": GAP(raw) (B, N), "z": (B, D, h, w)}."""
        if self.embedding == "hierarchical":  # one backbone pass gives every stage and f
            stages = stage_features(self.backbone, x)
            f, z = stages[-1], self.projection(stages[-len(SIDE_WIDTHS):])
        else:
            f = self.forward_features(x)
            z = self.project(f)
        raw = self.cams(f)
        return {"features": f, "cams": raw, "logits": raw.mean(dim=(2, 3)), "z": z}

    def param_groups(self, new_layer_lr_mult: float = 10.0) -> list[dict]:
        """Optimiser groups of the trainable parameters (frozen BatchNorm params are left out).

        Returns ``[{"name": "backbone", "params": [...], "lr_mult": 1.0},
        {"name": "new_layers", "params": classifier + projection, "lr_mult": new_layer_lr_mult}]``;
        the engine multiplies its base lr by each group's ``lr_mult``
        (OptimConfig.new_layer_lr_mult).
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        new = [p for m in (self.classifier, self.projection) for p in m.parameters() if p.requires_grad]
        return [{"name": "backbone", "params": backbone, "lr_mult": 1.0},
                {"name": "new_layers", "params": new, "lr_mult": float(new_layer_lr_mult)}]
