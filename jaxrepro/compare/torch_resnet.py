"""A torchvision-compatible ResNet in PyTorch, without importing torchvision.

torchvision cannot be imported beside the torch wheel this project pins, so the PyTorch
side of the comparison uses this module. Module names, and so ``state_dict`` keys, are
those of ``torchvision.models.resnet`` (ResNet v1.5: the stride sits on the 3x3 conv of a
bottleneck), so a real torchvision checkpoint loads with ``load_state_dict(strict=True)``.

Two options mirror the Flax model in ``jaxrepro.models``: ``width`` (channels of the stem
and of stage 1; stages 2-4 double it each time, torchvision's is 64) and ``stem``
(``'imagenet'``: 7x7/2 conv and 3x3/2 max-pool; ``'cifar'``: 3x3/1 conv, no max-pool).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import nn

STEMS = ("imagenet", "cifar")


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand, with a residual (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with torchvision's module layout.

    Args:
      block: ``BasicBlock`` or ``Bottleneck``.
      layers: number of blocks in each of the four stages.
      num_classes: outputs of the final ``fc`` layer.
      width: channels of the stem and stage 1 (torchvision: 64).
      stem: ``'imagenet'`` or ``'cifar'`` (see the module docstring).
    """

    def __init__(self, block, layers, num_classes=1000, width=64, stem="imagenet"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be four positive block counts, got {layers}")
        self.stem = stem
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = _conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # A pass-through keeps the module list identical for both stems (no parameters).
        self.maxpool = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            if stem == "imagenet"
            else nn.Identity()
        )
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        self._init_weights()

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        # torchvision's defaults: He-normal convs (fan_out), unit BatchNorm.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Runs the network and returns every stage's output (NCHW) and the logits.

        Keys: ``stem`` (after the max-pool, or after the first ReLU for the cifar stem),
        ``layer1`` .. ``layer4``, ``pooled`` (N, C) and ``logits`` (N, num_classes).
        """
        out = OrderedDict()
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out["stem"] = x
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out[name] = x
        x = torch.flatten(self.avgpool(x), 1)
        out["pooled"] = x
        out["logits"] = self.fc(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)["logits"]


# arch name -> (block class, blocks per stage, default width)
ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 64),
    "resnet_tiny": (BasicBlock, (1, 1, 1, 1), 8),
}


def build(
    arch: str, num_classes: int = 1000, *, width: int | None = None, stem: str = "imagenet"
) -> ResNet:
    """Builds a ResNet by name.

    Args:
      arch: one of ``ARCHS`` (resnet18/34/50/101/152, resnet_tiny).
      num_classes: outputs of the ``fc`` layer.
      width: channels of the stem and stage 1; None takes the arch's default.
      stem: ``'imagenet'`` or ``'cifar'``.

    Returns:
      The model, in training mode, initialised like torchvision's.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    block, layers, default_width = ARCHS[arch]
    width = default_width if width is None else width
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return ResNet(block, layers, num_classes=num_classes, width=width, stem=stem)


def _factory(arch: str):
    def make(num_classes: int = 1000, *, width: int | None = None, stem: str = "imagenet"):
        return build(arch, num_classes, width=width, stem=stem)

    make.__name__ = arch
    make.__doc__ = f"Builds {arch} (see ``build``)."
    return make


resnet18 = _factory("resnet18")
resnet34 = _factory("resnet34")
resnet50 = _factory("resnet50")
resnet101 = _factory("resnet101")
resnet152 = _factory("resnet152")
resnet_tiny = _factory("resnet_tiny")


@functools.lru_cache(maxsize=32)
def expected_shapes(
    arch: str, num_classes: int, width: int | None = None, stem: str = "imagenet"
) -> OrderedDict[str, tuple[int, ...]]:
    """The ``state_dict`` keys and shapes of a model, in ``state_dict`` order.

    Built on the meta device, so even ResNet-152 costs no memory or init time.
    """
    with torch.device("meta"):
        model = build(arch, num_classes, width=width, stem=stem)
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
