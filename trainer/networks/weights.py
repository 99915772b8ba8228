"""Loading local pretrained weight files into an encoder. Nothing here ever downloads.

Use `load_state_dict_file` + `load_encoder_weights` in an entrypoint that accepts `pretrained`:
the user downloads the weights file once (e.g. torchvision's ResNet-50 ImageNet weights) and passes
its path; every problem is a CheckpointError naming that path.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from detector_server.errors import CheckpointError

__all__ = ["load_state_dict_file", "load_encoder_weights"]


def load_state_dict_file(path: str | os.PathLike, *, hint: str = "") -> dict[str, torch.Tensor]:
    """Read a plain {name: tensor} state dict with `torch.load(weights_only=True)` on the CPU.

    `hint` (e.g. where to download the file) is appended to the not-found message.
    Raises CheckpointError(path=...) if the file is missing, unreadable or not a state dict.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"expected a path to a local weights file, got {path!r}{hint}",
                              field="pretrained")
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"pretrained weights file not found (weights are never downloaded)"
                              f"{hint}", path=str(p))
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a usable file"
        raise CheckpointError(f"cannot read as a torch state dict (weights_only=True): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                              path=str(p)) from None
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError("expected a plain state dict {parameter name: tensor}, got "
                              f"{type(state).__name__}", path=str(p))
    return state


def load_encoder_weights(encoder: nn.Module, state: dict[str, torch.Tensor],
                         path: str | os.PathLike,
                         *, ignore_prefixes: Iterable[str] = ()) -> None:
    """Copy `state` into `encoder` strictly, after dropping keys under `ignore_prefixes`.

    Raises CheckpointError(path=...) listing (the first few) missing, unexpected or mis-shaped keys.
    """
    prefixes = tuple(ignore_prefixes)
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else state
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", shapes)) if keys]
    if problems:
        raise CheckpointError(f"weights do not match the {type(encoder).__name__} encoder: "
                              + "; ".join(problems), path=str(path))
    encoder.load_state_dict(state, strict=True)
