"""`EmbeddingNet` (encoder + projection head), `DeployModel` (uint8 NHWC in, unit embeddings out).

Use `EmbeddingNet` for training: its raw outputs feed the losses (which normalise themselves).
Use `DeployModel` for everything after training (bank building, evaluation, ONNX export): it takes
the same uint8 RGB NHWC arrays as the runtime and does all normalisation inside, so the exported
graph and the Python evaluation are one and the same computation.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detector_server.validate import is_int

__all__ = ["EmbeddingNet", "DeployModel"]


class EmbeddingNet(nn.Module):
    """Encoder + MLP projection head (+ optional linear classifier on the penultimate feature).

    Args:
        encoder: module mapping float32 [B, 3, H, W] to the penultimate feature [B, feat_dim].
        feat_dim: width of the encoder output (512 for ResNet-18).
        head_dim: width of the projection (128 in the paper).
        num_classes: when given, adds `classifier = Linear(feat_dim, num_classes)` (the
            cross-entropy baseline uses it); None means no classifier and no "logits" output.

    The head is Linear(feat_dim, feat_dim)-ReLU-Linear(feat_dim, head_dim), as DESIGN section 1.
    `arch` is set by `create_model` (None for nets assembled by hand) and `num_classes` is kept for
    `model_args`.
    """

    def __init__(self, encoder: nn.Module, feat_dim: int, head_dim: int = 128,
                 num_classes: int | None = None):
        super().__init__()
        for name, v in (("feat_dim", feat_dim), ("head_dim", head_dim)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_classes is not None and (not is_int(num_classes) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True),
                                  nn.Linear(feat_dim, head_dim))
        self.classifier = None if num_classes is None else nn.Linear(feat_dim, num_classes)
        self.feat_dim, self.head_dim, self.num_classes = feat_dim, head_dim, num_classes
        self.arch: str | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embed a normalised batch.

        Args:
            x: float [B, 3, H, W], mean/std normalised, H and W >= 28 (any memory format).
        Returns:
            {"feature": [B, feat_dim] raw penultimate feature,
             "projection": [B, head_dim] raw head output,
             "logits": [B, num_classes] (only when the net has a classifier)}; none is normalised.
        """
        feature = self.encoder(x)
        out = {"feature": feature, "projection": self.head(feature)}
        if self.classifier is not None:
            out["logits"] = self.classifier(feature)
        return out


class DeployModel(nn.Module):
    """The deployable model: uint8 RGB NHWC images in, L2-normalised (feature, projection) out.

    Args:
        net: a trained `EmbeddingNet` (kept as a submodule; put both in eval mode before use).
        mean, std: 3 per-channel values in [0, 1] units, RGB order (PreprocessSpec.mean/std).

    The cast to float, /255, mean/std normalisation (registered buffers) and the NHWC->NCHW permute
    happen inside `forward`, which has no data-dependent control flow, so this exact module is what
    `torch.onnx.export` traces (dynamic batch dimension). The permuted input is channels_last in
    memory, so a net converted with `.to(memory_format=torch.channels_last)` needs no copy.
    """

    def __init__(self, net: EmbeddingNet, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if not isinstance(net, EmbeddingNet):
            raise TypeError(f"net must be an EmbeddingNet, got {type(net).__name__}")
        mean_t = _channel_vector("mean", mean)
        std_t = _channel_vector("std", std)
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {list(std)!r}")
        self.net = net
        self.register_buffer("mean", mean_t.view(1, 3, 1, 1))
        self.register_buffer("std", std_t.view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed raw images.

        Args:
            image: uint8 [N, H, W, 3] RGB, H and W >= 28 (the run's preprocess size).
        Returns:
            (feature float32 [N, feat_dim], projection float32 [N, head_dim]), each row unit-norm.
        """
        if image.dtype != torch.uint8 or image.dim() != 4:  # static properties: trace-safe
            raise TypeError(f"image must be a uint8 [N, H, W, 3] tensor, got {image.dtype} "
                            f"with {image.dim()} dims")
        x = (image.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        out = self.net(x)
        feature = F.normalize(out["feature"].float(), dim=1)
        projection = F.normalize(out["projection"].float(), dim=1)
        return feature, projection


def _channel_vector(name: str, values: Sequence[float]) -> torch.Tensor:
    """3 floats -> float32 tensor [3]; ValueError naming `name` otherwise."""
    try:
        t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers, got {values!r}") from None
    if t.numel() != 3 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be 3 finite numbers (RGB), got {values!r}")
    return t
