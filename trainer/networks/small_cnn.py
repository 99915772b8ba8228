"""`small_cnn`: a small, fast CNN for CPU demos and tests (well under 0.5M parameters with head).

Use it when there is no GPU: it learns real features on 32x32 CIFAR in a few CPU epochs. Not a
paper architecture; use resnet18_cifar for results.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Encoder, prepare_encoder
from .registry import register_model

__all__ = ["SmallCNN", "small_cnn"]


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(Encoder):
    """stage1: conv 32 @ full res; max-pool; stage2: 2x conv 64; max-pool; stage3: 2x conv 128;
    global average pool -> 128-d. 3x3 conv-BN-ReLU throughout."""

    last_stage = ("stage3.",)

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        a, b, c = widths
        self.stage1 = nn.Sequential(*_conv_bn_relu(3, a))
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(a, b), *_conv_bn_relu(b, b))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(b, c), *_conv_bn_relu(c, c))
        self.feat_dim = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float [B, 3, H, W] -> float [B, 128]."""
        x = self.stage3(self.stage2(self.stage1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


@register_model
def small_cnn(*, pretrained: str | None = None, freeze_early: bool = False) -> Encoder:
    """Small CPU CNN, 128-d feature; `pretrained` = local state dict in this key format."""
    return prepare_encoder(SmallCNN, pretrained=pretrained, freeze_early=freeze_early)
