"""Name registry of encoders (timm style) and the one way to build an `EmbeddingNet` from a name.

Use `create_model` wherever a network is needed and `model_args` / `build_from_args` to record a
net in a checkpoint and rebuild it. Add an architecture by decorating its entrypoint with
`@register_model` in a family module imported by `trainer/networks/__init__.py`; the tests
parametrize over `list_models()`, so it is tested from then on.

Entrypoint contract: `fn(*, pretrained: str | None, freeze_early: bool) -> nn.Module`, the module
mapping float [B, 3, H, W] (H, W >= 28) to [B, feat_dim] and carrying an int attribute `feat_dim`.
Entrypoints that have no pretrained weights or no early stages to freeze raise ValueError.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from detector_server.errors import CheckpointError
from detector_server.validate import is_int

from .embedding import EmbeddingNet

__all__ = ["register_model", "list_models", "is_model", "create_model", "ModelArgs", "model_args",
           "build_from_args"]

EncoderFn = Callable[..., nn.Module]
_model_entrypoints: dict[str, EncoderFn] = {}  # name -> encoder entrypoint
_model_to_module: dict[str, str] = {}          # name -> module that registered it


def register_model(fn: EncoderFn) -> EncoderFn:
    """Decorator: register an encoder entrypoint under its own `__name__` (warns on duplicates)."""
    name = fn.__name__
    if name in _model_entrypoints:
        warnings.warn(f"model {name!r} is registered twice ({_model_to_module[name]} and "
                      f"{fn.__module__}); the later one wins", stacklevel=2)
    _model_entrypoints[name] = fn
    _model_to_module[name] = fn.__module__
    return fn


def list_models() -> list[str]:
    """Sorted names of all registered architectures."""
    return sorted(_model_entrypoints)


def is_model(name: str) -> bool:
    """True when `name` is a registered architecture."""
    return name in _model_entrypoints


def create_model(name: str, *, num_classes: int, head_dim: int = 128,
                 with_classifier: bool = False, pretrained: str | None = None,
                 freeze_early: bool = False) -> EmbeddingNet:
    """Build encoder `name` and wrap it in an `EmbeddingNet` with the MLP projection head.

    Args:
        name: one of `list_models()`.
        num_classes: classes of the in-distribution set (recorded in `model_args`; also the
            classifier width when `with_classifier`).
        head_dim: projection width (128 in the paper).
        with_classifier: add a linear classifier on the penultimate feature ("logits" output).
        pretrained: local path of a weights file for the encoder (only some architectures,
            e.g. resnet50 with a torchvision-format state dict); never downloads.
        freeze_early: freeze every encoder parameter except the last stage (head stays trainable).
    Raises:
        ValueError: unknown name (the message lists the valid ones), bad sizes, or an option the
            architecture does not support. CheckpointError: unreadable or mismatched `pretrained`.

    Examples:
        >>> import torch
        >>> net = create_model("small_cnn", num_classes=10)
        >>> out = net(torch.randn(2, 3, 32, 32))
        >>> out["feature"].shape, out["projection"].shape
        (torch.Size([2, 128]), torch.Size([2, 128]))
        >>> net = create_model("resnet50", num_classes=100, pretrained="/models/resnet50.pth",
        ...                    freeze_early=True)  # doctest: +SKIP
    """
    if name not in _model_entrypoints:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("head_dim", head_dim)
    encoder = _model_entrypoints[name](pretrained=pretrained, freeze_early=bool(freeze_early))
    net = EmbeddingNet(encoder, encoder.feat_dim, head_dim,
                       num_classes if with_classifier else None)
    net.arch, net.num_classes = name, num_classes
    return net


@dataclass(frozen=True)
class ModelArgs:
    """What rebuilds a net's architecture from a checkpoint (weights come from the state dict)."""

    arch: str                      # registered architecture name
    num_classes: int               # in-distribution classes
    head_dim: int = 128            # projection width
    with_classifier: bool = False  # linear classifier on the penultimate feature

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelArgs":
        """Validate a `model_args` dict; CheckpointError naming the field at fault."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"expected a dict, got {type(d).__name__}", field="model_args")
        for key in ("arch", "num_classes"):
            if key not in d:
                raise CheckpointError("missing key", field=f"model_args.{key}")
        arch, head_dim = d["arch"], d.get("head_dim", 128)
        if not isinstance(arch, str) or arch not in _model_entrypoints:
            raise CheckpointError(f"unknown architecture {arch!r}; valid names: "
                                  f"{', '.join(list_models())}", field="model_args.arch")
        for key, v in (("num_classes", d["num_classes"]), ("head_dim", head_dim)):
            if not is_int(v) or v < 1:
                raise CheckpointError(f"expected a positive int, got {v!r}",
                                      field=f"model_args.{key}")
        with_classifier = d.get("with_classifier", False)
        if not isinstance(with_classifier, bool):
            raise CheckpointError(f"expected a bool, got {with_classifier!r}",
                                  field="model_args.with_classifier")
        return cls(arch, d["num_classes"], head_dim, with_classifier)


def model_args(net: EmbeddingNet) -> dict[str, Any]:
    """{"arch", "num_classes", "head_dim", "with_classifier"} of a net made by `create_model`."""
    if not isinstance(net, EmbeddingNet) or net.arch is None:
        raise ValueError("net must be an EmbeddingNet built by create_model (its arch is unknown)")
    return ModelArgs(net.arch, net.num_classes, net.head_dim, net.classifier is not None).to_dict()


def build_from_args(args: Mapping[str, Any]) -> EmbeddingNet:
    """Rebuild the (randomly initialised) net described by a `model_args` dict; load weights after.

    Raises CheckpointError naming the `model_args.<key>` field that is missing or invalid.
    """
    a = ModelArgs.from_dict(args)
    return create_model(a.arch, num_classes=a.num_classes, head_dim=a.head_dim,
                        with_classifier=a.with_classifier)


def _check_positive_int(name: str, v: Any) -> None:
    if not is_int(v) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
