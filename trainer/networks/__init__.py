"""Networks: encoders in a name registry, the projection-head wrapper and the deployable module.

Use `create_model(name, num_classes=...)` to get a trainable `EmbeddingNet`, `DeployModel(net,
mean, std)` for the uint8-NHWC module that evaluation and the ONNX exporter use, and
`model_args(net)` / `build_from_args(args)` to record and rebuild a net from a checkpoint.

Modules (tests: tests/trainer/test_networks.py):
- registry.py       `register_model`, `create_model`, `list_models`, `ModelArgs`, `model_args`,
                    `build_from_args`
- embedding.py      `EmbeddingNet` (encoder + MLP head + optional classifier), `DeployModel`
- encoder.py        `Encoder` base (feat_dim, last_stage, freeze_early) and `prepare_encoder`
- weights.py        loading local pretrained state-dict files (never downloads)
- resnet_cifar.py   `resnet18_cifar`      512-d
- wide_resnet.py    `wrn40_2`             128-d
- densenet.py       `densenet_bc`         342-d (DenseNet-BC L=100, k=12)
- resnet_imagenet.py `resnet50`           2048-d (torchvision, ImageNet stem)
- small_cnn.py      `small_cnn`           128-d, < 0.5M parameters, for CPU demos and tests
Importing this package registers every family above.
"""
from __future__ import annotations

# importing the family modules registers their architectures
from . import densenet, resnet_cifar, resnet_imagenet, small_cnn, wide_resnet  # noqa: F401
from .embedding import DeployModel, EmbeddingNet
from .registry import (
                       ModelArgs,
                       build_from_args,
                       create_model,
                       is_model,
                       list_models,
                       model_args,
                       register_model,
)
from .weights import load_state_dict_file

__all__ = ["register_model", "create_model", "list_models", "is_model", "EmbeddingNet",
           "DeployModel", "ModelArgs", "model_args", "build_from_args", "load_state_dict_file"]
