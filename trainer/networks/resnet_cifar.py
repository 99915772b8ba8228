"""ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool): the paper's 32x32 encoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Encoder, prepare_encoder
from .registry import register_model

__all__ = ["ResNetCifar", "resnet18_cifar"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN with an identity (or 1x1 conv-BN) shortcut; ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(Encoder):
    """CIFAR ResNet: 3x3 stem at full resolution, 4 stages of BasicBlocks (64-128-256-512)."""

    last_stage = ("layer4.",)

    def __init__(self, blocks: tuple[int, int, int, int] = (2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, cin, layers = (64, 128, 256, 512), 64, []
        for i, (w, n) in enumerate(zip(widths, blocks)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            layers.append(nn.Sequential(*[BasicBlock(cin if j == 0 else w, w, s)
                                          for j, s in enumerate(strides)]))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.feat_dim = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float [B, 3, H, W] -> float [B, 512]."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


@register_model
def resnet18_cifar(*, pretrained: str | None = None, freeze_early: bool = False) -> Encoder:
    """ResNet-18, CIFAR stem, 512-d feature; `pretrained` = local state dict in this key format."""
    return prepare_encoder(lambda: ResNetCifar((2, 2, 2, 2)), pretrained=pretrained,
                           freeze_early=freeze_early)
