"""Loading local pretrained weight files into an encoder. Nothing here ever downloads.

Use `load_state_dict_file` + `load_encoder_weights` in an entrypoint that accepts `pretrained`:
the user downloads the weights file once (e.g. torchvision's ResNet-50 ImageNet weights) and passes
its path; every problem is a CheckpointError naming that path.

The expected file (`EXPECTED_FORMAT`): what `torch.save(model.state_dict(), PATH)` writes, a dict of
parameter names to tensors. Accepted around it: the common wrappers (`{"state_dict": ...}`,
`{"model": ...}`, `{"model_state_dict": ...}`, `{"net": ...}`, as training scripts, timm and
Lightning save them, and this project's own model.pt), the `module.` prefix of DataParallel/DDP,
and a sub-module prefix such as `encoder.` or `backbone.` (the one whose names fit the encoder).
Pickled whole models are refused: unpickling them would run code from the file.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detector_server.errors import CheckpointError

__all__ = ["load_state_dict_file", "load_encoder_weights", "EXPECTED_FORMAT"]

log = logging.getLogger(__name__)

EXPECTED_FORMAT = ("a PyTorch state dict, as torch.save(model.state_dict(), PATH) writes it "
                   "(wrapped as {'state_dict': ...} or {'model': ...} and 'module.'-prefixed names "
                   "are accepted)")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
_MAGIC = (b"PK\x03\x04", b"\x80")     # torch.save's zip format; the legacy pickle format


def load_state_dict_file(path: str | os.PathLike, *, hint: str = "") -> dict[str, torch.Tensor]:
    """Read a {name: tensor} state dict with `torch.load(weights_only=True)` on the CPU, unwrapping
    the common wrappers and the `module.` prefix (see the module doc).

    `hint` (e.g. where to download the file) is appended to the not-found message.
    Raises CheckpointError(path=...) if the file is missing, not a PyTorch file, a pickled object,
    or holds no state dict.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"expected a path to a local weights file, got {path!r}{hint}",
                              field="pretrained")
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"pretrained weights file not found (weights are never downloaded)"
                              f"{hint}", path=str(p))
    with open(p, "rb") as f:
        head = f.read(4)
    if not head.startswith(_MAGIC):
        raise CheckpointError(f"not a PyTorch weights file (it starts with {head!r}); expected "
                              f"{EXPECTED_FORMAT}", path=str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a usable file"
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"holds a pickled Python object ({found[1]}), not a state dict: "
                                  "save the weights with torch.save(model.state_dict(), PATH) and "
                                  "pass that file (pickled objects are never loaded: that would "
                                  "run code from the file)", path=str(p)) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else "empty or truncated file"
        raise CheckpointError(f"cannot read as a PyTorch state dict ({type(e).__name__}: {first}); "
                              f"expected {EXPECTED_FORMAT}", path=str(p)) from None
    return _unwrap(obj, p)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside `obj` (at most two wrapper levels), `module.` prefixes removed."""
    for _ in range(3):
        if _is_state_dict(obj) or not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not _is_state_dict(obj):
        keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
        raise CheckpointError(f"expected {EXPECTED_FORMAT}; got a {type(obj).__name__}{keys}",
                              path=str(path))
    while all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_encoder_weights(encoder: nn.Module, state: dict[str, torch.Tensor],
                         path: str | os.PathLike,
                         *, ignore_prefixes: Iterable[str] = ()) -> None:
    """Copy `state` into `encoder`: every encoder tensor must be there with its shape.

    Keys under `ignore_prefixes` (e.g. a classifier) are left out; when the names carry a
    sub-module prefix (`encoder.`, `backbone.`, ...), the prefix under which most names fit the
    encoder is used and the other keys are left out. Logs how many tensors were loaded and which
    were left out. Raises CheckpointError(path=...) listing (the first few) missing, unexpected or
    mis-shaped keys.
    """
    prefixes = tuple(ignore_prefixes)
    own = encoder.state_dict()
    prefix = _best_prefix(state, set(own))
    used = {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(prefixes or ("\0",))}
    left_out = sorted(k for k in state if not (k.startswith(prefix) and k[len(prefix):] in used))
    missing = sorted(set(own) - set(used))
    unexpected = sorted(set(used) - set(own))
    shapes = [f"{k} {tuple(used[k].shape)} != {tuple(own[k].shape)}"
              for k in own if k in used and used[k].shape != own[k].shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", shapes)) if keys]
    if problems:
        raise CheckpointError(f"weights do not match the {type(encoder).__name__} encoder: "
                              + "; ".join(problems), path=str(path))
    encoder.load_state_dict(used, strict=True)
    log.info("pretrained weights %s: loaded %d tensors into the %s encoder%s; left out %d%s", path,
             len(used), type(encoder).__name__, f" (names under {prefix!r})" if prefix else "",
             len(left_out), f": {', '.join(left_out[:10])}{' ...' if len(left_out) > 10 else ''}"
             if left_out else "")


def _best_prefix(state: dict[str, torch.Tensor], own: set[str]) -> str:
    """"" or the first-level prefix ("encoder.") under which most names of `state` are in `own`."""
    candidates = {""} | {k.split(".", 1)[0] + "." for k in state if "." in k}
    return max(sorted(candidates), key=lambda p: (
        sum(k[len(p):] in own for k in state if k.startswith(p)), p == ""))
