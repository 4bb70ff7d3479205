"""CAMNet: backbone + 1×1 classifier (class activation maps) + projection head v(.) of CPAL.

The classifier is a bias-free 1×1 conv, so GAP followed by the classifier equals the spatial
mean of the raw CAMs: ``logits = cams(f).mean((2, 3))`` is both the classification score of the
BCE loss and consistent with the maps the CPAL losses use.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# Hidden width of the projection head: min(C, PROJ_HIDDEN).
PROJ_HIDDEN = 256


def projection_head(in_channels: int, proj_dim: int) -> nn.Module:
    """v(.) of Eq. 4: 1×1 conv C -> min(C, 256) -> ReLU -> 1×1 conv -> D; identity when D == 0.

    (B, C, h, w) -> (B, D, h, w), or (B, C, h, w) unchanged when ``proj_dim == 0``.
    """
    if proj_dim == 0:
        return nn.Identity()
    hidden = min(in_channels, PROJ_HIDDEN)
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, proj_dim, 1))


class CAMNet(nn.Module):
    """The network CPAL trains: features f, raw CAMs w_nᵀf, image logits and projections z.

    Args:
        backbone: module with ``out_channels`` (C) mapping (B, 3, H, W) -> (B, C, h, w), OS 16.
        num_classes: foreground classes N (background has no classifier row).
        proj_dim: projection dim D of v(.); 0 = identity, z = f (D = C).
        freeze_bn: keep every BatchNorm of the backbone in eval mode (running statistics fixed,
            also under ``model.train()``) and its affine parameters frozen (requires_grad False),
            as SIPE does; those parameters then appear in no optimiser group.

    The classifier is ``nn.Conv2d(C, N, 1, bias=False)`` initialised with Xavier-uniform
    (bound sqrt(6 / (C + N)), so initial CAMs are small and of either sign); the projection convs
    keep PyTorch's default (Kaiming-uniform) initialisation.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, proj_dim: int = 128,
                 freeze_bn: bool = True):
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
        self.embed_dim = proj_dim or channels  # D of z
        self.freeze_bn = freeze_bn
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        self.projection = projection_head(channels, proj_dim)
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
        f = self.forward_features(x)
        raw = self.cams(f)
        return {"features": f, "cams": raw, "logits": raw.mean(dim=(2, 3)), "z": self.project(f)}

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
