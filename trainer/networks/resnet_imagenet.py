"""torchvision ResNet-50 (ImageNet stem) for large inputs; 2048-d feature.

The DESIGN ImageNet-100 recipe fine-tunes it from ImageNet weights with everything but `layer4`
frozen: `create_model("resnet50", ..., pretrained=PATH, freeze_early=True)`. Weights are never
downloaded: PATH is a torchvision-format state dict the user saved beforehand.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50 as tv_resnet50

from detector_server.errors import CheckpointError

from .encoder import Encoder, prepare_encoder
from .registry import register_model

__all__ = ["ResNet50Encoder", "resnet50"]

DOWNLOAD_HINT = (
    "; download a torchvision-format ResNet-50 state dict yourself (for example the file behind "
    "torchvision.models.ResNet50_Weights.IMAGENET1K_V2, resnet50-11ad3fa6.pth, from "
    "https://download.pytorch.org/models/) and pass its local path as pretrained")

_WEIGHT_NAMES = {"imagenet", "true", "default", "imagenet1k_v1", "imagenet1k_v2"}  # not paths


class ResNet50Encoder(Encoder):
    """torchvision's resnet50 without `fc`; parameter names equal torchvision's (minus `fc.*`)."""

    last_stage = ("layer4.",)

    def __init__(self) -> None:
        super().__init__()
        tv = tv_resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2 = tv.layer1, tv.layer2
        self.layer3, self.layer4 = tv.layer3, tv.layer4
        self.feat_dim = tv.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float [B, 3, H, W] (H, W >= 28; 224 for ImageNet) -> float [B, 2048]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


@register_model
def resnet50(*, pretrained: str | None = None, freeze_early: bool = False) -> Encoder:
    """torchvision ResNet-50, 2048-d; `pretrained` = local torchvision state dict (fc.* ignored);
    `freeze_early` leaves only layer4 trainable (and the head, which lives outside the encoder)."""
    if isinstance(pretrained, str) and pretrained.strip().lower() in _WEIGHT_NAMES \
            and not Path(pretrained).exists():
        raise CheckpointError(f"{pretrained!r} is not a weights file: weights are never "
                              f"downloaded{DOWNLOAD_HINT}", field="pretrained")
    return prepare_encoder(ResNet50Encoder, pretrained=pretrained, freeze_early=freeze_early,
                           hint=DOWNLOAD_HINT, ignore_prefixes=("fc.",))
