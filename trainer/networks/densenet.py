"""DenseNet-BC (L=100, k=12) for 32x32 inputs, the paper's Table 6 encoder; 342-d feature."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Encoder, prepare_encoder
from .registry import register_model

__all__ = ["DenseNetBC", "densenet_bc"]


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1 (4k) - BN-ReLU-conv3x3 (k); output = input with k new channels appended."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compress channels) - 2x2 average pool."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(Encoder):
    """CIFAR DenseNet-BC: 3x3 stem (2k channels), 3 dense blocks of (depth-4)/6 bottlenecks,
    transitions with compression 0.5, final BN-ReLU and global average pool."""

    last_stage = ("block3.", "bn.")

    def __init__(self, depth: int = 100, growth: int = 12, reduction: float = 0.5):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n, c = (depth - 4) // 6, 2 * growth
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        stages: list[nn.Module] = []
        for b in range(3):
            stages.append(nn.Sequential(*[Bottleneck(c + i * growth, growth) for i in range(n)]))
            c += n * growth
            if b < 2:
                stages.append(Transition(c, int(c * reduction)))
                c = int(c * reduction)
        self.block1, self.trans1, self.block2, self.trans2, self.block3 = stages
        self.bn = nn.BatchNorm2d(c)
        self.feat_dim = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float [B, 3, H, W] -> float [B, 342] (for L=100, k=12)."""
        x = self.trans1(self.block1(self.conv1(x)))
        x = self.block3(self.trans2(self.block2(x)))
        return F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)


@register_model
def densenet_bc(*, pretrained: str | None = None, freeze_early: bool = False) -> Encoder:
    """DenseNet-BC L=100, k=12, 342-d; `pretrained` = local state dict in this key format."""
    return prepare_encoder(lambda: DenseNetBC(100, 12), pretrained=pretrained,
                           freeze_early=freeze_early)
