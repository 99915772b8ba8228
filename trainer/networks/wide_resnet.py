"""WideResNet-40-2 (Zagoruyko & Komodakis 2016), the paper's Table 6 encoder; 128-d feature."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Encoder, prepare_encoder
from .registry import register_model

__all__ = ["WideResNet", "wrn40_2"]


class WideBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-conv3x3; 1x1 conv shortcut on width change.

    When the width changes, the shortcut also takes the pre-activated input (as in the reference
    WRN code).
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(Encoder):
    """WRN-depth-k: stem conv 16, three groups of (depth-4)/6 blocks at 16k, 32k, 64k, BN-ReLU."""

    last_stage = ("block3.", "bn.")

    def __init__(self, depth: int = 40, widen: int = 2):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        groups = []
        for g in range(3):
            groups.append(nn.Sequential(*[
                WideBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1],
                          (1 if g == 0 else 2) if i == 0 else 1) for i in range(n)]))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.feat_dim = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float [B, 3, H, W] -> float [B, 64 * widen]."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)


@register_model
def wrn40_2(*, pretrained: str | None = None, freeze_early: bool = False) -> Encoder:
    """WideResNet-40-2, 128-d feature; `pretrained` = local state dict in this key format."""
    return prepare_encoder(lambda: WideResNet(40, 2), pretrained=pretrained,
                           freeze_early=freeze_early)
