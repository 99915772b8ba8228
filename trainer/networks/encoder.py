"""`Encoder` base class (feature width, last stage, freezing) and `prepare_encoder`.

Use `Encoder` as the base of every registered encoder and return `prepare_encoder(...)` from its
entrypoint: this gives every architecture the same `pretrained` (local file) and `freeze_early`
behaviour, so `create_model` never needs to know which architecture it builds.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .weights import load_encoder_weights, load_state_dict_file

__all__ = ["Encoder", "prepare_encoder"]


class Encoder(nn.Module):
    """Maps float [B, 3, H, W] (H, W >= 28) to the penultimate feature float [B, feat_dim].

    Subclasses set `feat_dim` and `last_stage` (parameter-name prefixes, with the trailing dot,
    of the last stage and anything after it, which stay trainable under `freeze_early`).
    """

    feat_dim: int
    last_stage: tuple[str, ...]

    def __init__(self) -> None:
        super().__init__()
        self.frozen_early = False

    def freeze_early(self) -> None:
        """Freeze every parameter outside `last_stage`; their BatchNorms stay in eval mode.

        Frozen BatchNorms keep their running statistics (a frozen stage must compute the same
        function in training and evaluation), also after a later `.train()` call.
        """
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(self.last_stage))
        self.frozen_early = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        if self.frozen_early:
            for name, m in self.named_modules():
                if isinstance(m, _BatchNorm) and not (name + ".").startswith(self.last_stage):
                    m.eval()
        return self


def prepare_encoder(build: Callable[[], Encoder], *, pretrained: str | os.PathLike | None,
                    freeze_early: bool, hint: str = "",
                    ignore_prefixes: tuple[str, ...] = ()) -> Encoder:
    """Build an encoder, load local weights (if `pretrained`), freeze its early stages (if asked).

    `pretrained` is a path to a state dict in the encoder's own key format (keys under
    `ignore_prefixes`, e.g. a classifier, are dropped); `hint` says where to get the file. The file
    is read before the encoder is built, so a bad path fails fast.
    Raises CheckpointError naming the path when the file is missing, unreadable or does not match.
    """
    state = None if pretrained is None else load_state_dict_file(pretrained, hint=hint)
    encoder = build()
    if state is not None:
        load_encoder_weights(encoder, state, pretrained, ignore_prefixes=ignore_prefixes)
    if freeze_early:
        encoder.freeze_early()
    return encoder
