"""The seed document's 1-channel ResNet, repaired, with the seed's names and output contract.

Layer names and shapes follow the seed so that a state_dict trained with a repaired copy of
the seed loads here with strict checks. The seed's defects are fixed as follows:

* ``BasicBlock`` gets a real 3x3 conv and a projection shortcut (``downsample``: 1x1 conv +
  BatchNorm) wherever the stride or the width changes; checkpoints that named it ``shortcut``
  (the seed's Bottleneck spelling) load too.
* ``fc`` takes ``512 * expansion * 4`` inputs, so the Bottleneck depths run.
* ``forward`` does not copy a tensor it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, the seed's undefined helper."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a residual connection (ResNet18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels * self.expansion:
            self.downsample = nn.Sequential(
                conv1x1(in_channels, channels * self.expansion, stride),
                nn.BatchNorm2d(channels * self.expansion),
            )
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += residual
        return self.relu(out)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A repaired seed may name the projection like its Bottleneck does: accept both.
        for key in [k for k in state_dict if k.startswith(prefix + "shortcut.")]:
            state_dict[prefix + "downsample." + key[len(prefix + "shortcut.") :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand, and a residual connection (ResNet50/101/152)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, self.expansion * planes)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                conv1x1(in_planes, self.expansion * planes, stride),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        return F.relu(out)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """Spectrogram ``(B, 1, n_mels, frames)`` in; ``(logits (B, num_classes), embedding (B, E))`` out."""

    def __init__(
        self,
        block: Block,
        num_blocks: list[int],
        num_classes: int = 9,
        embedding_size: int = 256,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avg_pool = nn.AdaptiveAvgPool2d((4, 1))  # 4 frequency bands x 1 over time
        self.fc = nn.Linear(512 * block.expansion * 4, embedding_size)
        self.linear = nn.Linear(embedding_size, num_classes)

    def _make_layer(self, block: Block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for s in strides:
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """The embedding: the fc layer's output, before the classifier."""
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x, dtype=torch.float32)
        out = F.relu(self.bn1(self.conv1(x)))  # (B, 64, F, T)
        out = self.layer1(out)  # (B, 64e, F, T)
        out = self.layer2(out)  # (B, 128e, F/2, T/2)
        out = self.layer3(out)  # (B, 256e, F/4, T/4)
        out = self.layer4(out)  # (B, 512e, F/8, T/8)
        out = self.avg_pool(out)  # (B, 512e, 4, 1)
        out = out.flatten(1)  # (B, 512e*4)
        return self.fc(out)  # (B, E)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        embedding = self.forward_features(x)  # (B, E)
        logits = self.linear(embedding)  # (B, num_classes)
        return logits, embedding


def ResNet18(num_classes: int = 9, embedding_size: int = 256) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, embedding_size)


def ResNet34(num_classes: int = 9, embedding_size: int = 256) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, embedding_size)


def ResNet50(num_classes: int = 9, embedding_size: int = 256) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, embedding_size)


def ResNet101(num_classes: int = 9, embedding_size: int = 256) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, embedding_size)


def ResNet152(num_classes: int = 9, embedding_size: int = 256) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, embedding_size)


ARCHITECTURES: dict[str, Callable[..., ResNet]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
}


def build(arch: str, num_classes: int = 9, embedding_size: int = 256) -> ResNet:
    """Build a network by its manifest name (``resnet18`` .. ``resnet152``)."""
    try:
        factory = ARCHITECTURES[arch.lower()]
    except KeyError:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown architecture {arch!r}; expected one of {known}") from None
    return factory(num_classes=num_classes, embedding_size=embedding_size)
