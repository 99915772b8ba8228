"""Batched, per-sample SimCLR augmentation on whatever device the batch lives on (GPU when present).

Use `Augment` in the training loop instead of per-image transforms in DataLoader workers: it takes a
uint8 NHWC batch already on the device and returns normalised float NCHW views, each image with its
own random parameters, with no CPU round trip. DESIGN.md's recipe:

    RandomResizedCrop(size, scale=(s_min, 1)) -> horizontal flip p=0.5
    -> ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 -> grayscale p=0.2 -> normalise(mean, std)

Differences from torchvision's per-image transforms (kept small on purpose):
- the crop's aspect ratio is sampled once and the box clamped to the image instead of torchvision's
  ten rejection tries; cropping and resizing is one `roi_align` (bilinear, one sample at each
  output pixel's centre: torchvision's bilinear resize of the crop, the identity at full scale);
- jitter is applied in the fixed order brightness, contrast, saturation, hue (torchvision permutes);
  hue is a rotation of the chroma plane in YIQ space, a linear stand-in for HSV hue shifting.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["Augment", "normalize_uint8"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def normalize_uint8(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] normalised: the evaluation transform."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


# Constant matrices are made once, on the CPU, and reach the device as Augment's buffers: a tensor
# built from Python numbers inside forward() would be a host-to-device copy, and torch.linalg.inv
# on CUDA checks its result on the host; either one stalls the GPU queue on every call.
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


def _gray(x: Tensor, luma: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luminance; luma: float [1, 3, 1, 1] on x's device."""
    return (x * luma).sum(1, keepdim=True)


class Augment(nn.Module):
    """One random view per call. forward(uint8 [B, H, W, 3]) -> float32 [B, 3, size, size]."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                 jitter_p: float = 0.8, gray_p: float = 0.2, flip_p: float = 0.5):
        super().__init__()
        self.size, self.scale, self.ratio = size, scale, ratio
        self.jitter, self.jitter_p, self.gray_p, self.flip_p = jitter, jitter_p, gray_p, flip_p
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("to_yiq", _TO_YIQ.clone(), persistent=False)
        self.register_buffer("from_yiq", _FROM_YIQ.clone(), persistent=False)

    def _boxes(self, b: int, h: int, w: int, device: torch.device) -> Tensor:
        """Per-sample crop boxes [B, 5] (batch index, x1, y1, x2, y2) in pixel coordinates."""
        area = torch.empty(b, device=device).uniform_(*self.scale) * (h * w)
        log_r = torch.empty(b, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        r = log_r.exp()
        cw = (area * r).sqrt().clamp(1.0, w)
        ch = (area / r).sqrt().clamp(1.0, h)
        x1 = torch.rand(b, device=device) * (w - cw)
        y1 = torch.rand(b, device=device) * (h - ch)
        idx = torch.arange(b, device=device, dtype=torch.float32)
        return torch.stack([idx, x1, y1, x1 + cw, y1 + ch], dim=1)

    def _jitter(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        bri, con, sat, hue = self.jitter
        apply = (torch.rand(b, 1, 1, 1, device=x.device) < self.jitter_p).float()

        def factor(amount: float) -> Tensor:
            f = torch.empty(b, 1, 1, 1, device=x.device).uniform_(1 - amount, 1 + amount)
            return 1 + (f - 1) * apply                     # factor 1 where jitter is not applied

        x = (x * factor(bri)).clamp_(0, 1)
        m = _gray(x, self.luma).mean(dim=(2, 3), keepdim=True)
        x = ((x - m) * factor(con) + m).clamp_(0, 1)
        g = _gray(x, self.luma)
        x = ((x - g) * factor(sat) + g).clamp_(0, 1)
        theta = torch.empty(b, device=x.device).uniform_(-hue, hue) * 2 * math.pi * apply.view(b)
        return self._rotate_hue(x, theta, self.to_yiq, self.from_yiq).clamp_(0, 1)

    @staticmethod
    def _rotate_hue(x: Tensor, theta: Tensor, to_yiq: Tensor = _TO_YIQ,
                    from_yiq: Tensor = _FROM_YIQ) -> Tensor:
        """Rotate chroma by per-sample angle theta [B] (radians) in YIQ space; the matrices
        [3, 3] must be on x's device (the defaults are CPU tensors)."""
        c, s = theta.cos(), theta.sin()
        one, zero = torch.ones_like(theta), torch.zeros_like(theta)
        rot = torch.stack([one, zero, zero, zero, c, -s, zero, s, c], dim=1).view(-1, 3, 3)
        m = from_yiq @ rot @ to_yiq                          # [B, 3, 3]
        b, _, h, w = x.shape
        return torch.bmm(m, x.reshape(b, 3, h * w)).view(b, 3, h, w)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected uint8 [B, H, W, 3], got {images.dtype} "
                             f"{tuple(images.shape)}")
        b, h, w, _ = images.shape
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        x = roi_align(x, self._boxes(b, h, w, x.device), output_size=self.size,
                      spatial_scale=1.0, sampling_ratio=1, aligned=True)
        flip = torch.rand(b, device=x.device) < self.flip_p
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        x = self._jitter(x)
        gray = torch.rand(b, device=x.device) < self.gray_p
        x = torch.where(gray.view(b, 1, 1, 1), _gray(x, self.luma).expand_as(x), x)
        return (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
