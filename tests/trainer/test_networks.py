"""Tests for trainer/networks: registry, every registered encoder, EmbeddingNet, DeployModel.

Parametrized over `list_models()`, so registering an architecture enrolls it here.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector_server.errors import CheckpointError
from trainer.networks import (
    DeployModel,
    EmbeddingNet,
    build_from_args,
    create_model,
    list_models,
    model_args,
    register_model,
    registry,
)
from trainer.networks.encoder import Encoder
from trainer.networks.resnet_imagenet import ResNet50Encoder

FEAT_DIMS = {"resnet18_cifar": 512, "wrn40_2": 128, "densenet_bc": 342, "resnet50": 2048,
             "small_cnn": 128}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _size(name: str) -> int:
    return 64 if name == "resnet50" else 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nets() -> dict[str, EmbeddingNet]:
    """One eval-mode net (with classifier, 10 classes) per architecture, built on first use."""
    cache: dict[str, EmbeddingNet] = {}

    class Lazy(dict):
        def __missing__(self, name):
            torch.manual_seed(0)
            cache[name] = create_model(name, num_classes=10, with_classifier=True).eval()
            return cache[name]
    return Lazy()


# --- every registered architecture -----------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_forward_keys_shapes_finite(name, nets):
    net = nets[name]
    assert net.feat_dim == FEAT_DIMS.get(name, net.feat_dim) and net.head_dim == 128
    for size in (28, _size(name)):  # MNIST-size inputs must work too
        with torch.no_grad():
            out = net(torch.randn(2, 3, size, size))
        assert set(out) == {"feature", "projection", "logits"}
        assert out["feature"].shape == (2, net.feat_dim)
        assert out["projection"].shape == (2, 128)
        assert out["logits"].shape == (2, 10)
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("name", list_models())
def test_channels_last_matches_contiguous(name, nets):
    net = nets[name]
    x = torch.randn(2, 3, _size(name), _size(name))
    cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = net(x)
        got = cl(x.contiguous(memory_format=torch.channels_last))
    for k in ref:  # relative to the output's scale: untrained nets in eval mode can reach 1e6
        scale = ref[k].abs().max().item()
        torch.testing.assert_close(got[k], ref[k], atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("name", list_models())
def test_deploy_model_unit_norm_and_equals_manual(name, nets, ood_images):
    net = nets[name]
    images = torch.from_numpy(ood_images[:8])  # uint8 [8, 32, 32, 3], colour photo patches
    dm = DeployModel(net, MEAN, STD).eval()
    with torch.no_grad():
        feature, projection = dm(images)
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        ref = net(x)
    for got, raw in ((feature, ref["feature"]), (projection, ref["projection"])):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.norm(dim=1), torch.ones(8), atol=1e-5, rtol=0)
        torch.testing.assert_close(got, F.normalize(raw, dim=1), atol=1e-5, rtol=1e-4)
    assert feature.shape == (8, net.feat_dim) and projection.shape == (8, 128)


@pytest.mark.parametrize("name", list_models())
def test_freeze_early_leaves_last_stage_and_head_trainable(name):
    net = create_model(name, num_classes=10, with_classifier=True, freeze_early=True)
    enc = net.encoder
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("encoder.") for n in frozen)
    assert {n for n in trainable if n.startswith(("head.", "classifier."))} == \
        {n for n, _ in net.named_parameters() if n.startswith(("head.", "classifier."))}
    assert {n for n in trainable if n.startswith("encoder.")} == \
        {n for n, _ in net.named_parameters() if n[len("encoder."):].startswith(enc.last_stage)}
    # frozen BatchNorms stay in eval mode (running stats untouched) after .train()
    net.train()
    bns = {n: m for n, m in enc.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all(m.training == (n + ".").startswith(enc.last_stage) for n, m in bns.items())
    first = next(m for n, m in bns.items() if not (n + ".").startswith(enc.last_stage))
    before = first.running_mean.clone()
    net(torch.randn(4, 3, _size(name), _size(name)))["projection"].sum().backward()
    torch.testing.assert_close(first.running_mean, before, atol=0, rtol=0)
    assert all(p.grad is None for n, p in net.named_parameters() if n in frozen)


def test_resnet50_last_stage_is_layer4():
    # with the test above: freeze_early leaves exactly layer4 (+ head) trainable (DESIGN recipe)
    assert ResNet50Encoder.last_stage == ("layer4.",)


# --- small_cnn budget ---------------------------------------------------------------------------

def test_small_cnn_parameter_budget():
    for classes in (10, 100):
        net = create_model("small_cnn", num_classes=classes, with_classifier=True)
        assert sum(p.numel() for p in net.parameters()) <= 500_000


# --- EmbeddingNet / DeployModel details -------------------------------------------------------

def test_no_classifier_means_no_logits(nets):
    net = create_model("small_cnn", num_classes=10, head_dim=64).eval()
    out = net(torch.randn(2, 3, 32, 32))
    assert set(out) == {"feature", "projection"} and out["projection"].shape == (2, 64)


def test_deploy_model_rejects_bad_input_and_arguments(nets):
    net = nets["small_cnn"]
    dm = DeployModel(net, MEAN, STD)
    with pytest.raises(TypeError, match="uint8"):
        dm(torch.zeros(1, 32, 32, 3))
    with pytest.raises(TypeError, match="uint8"):
        dm(torch.zeros(32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="std must be positive"):
        DeployModel(net, MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean must be 3"):
        DeployModel(net, (0.5, 0.5), STD)
    with pytest.raises(TypeError, match="EmbeddingNet"):
        DeployModel(net.encoder, MEAN, STD)


def test_embedding_net_rejects_bad_sizes():
    with pytest.raises(ValueError, match="head_dim"):
        EmbeddingNet(nn.Identity(), 8, head_dim=0)
    with pytest.raises(ValueError, match="num_classes"):
        EmbeddingNet(nn.Identity(), 8, num_classes=0)


# --- registry ----------------------------------------------------------------------------------

def test_unknown_name_raises_with_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'") as e:
        create_model("resnet19", num_classes=10)
    assert all(n in str(e.value) for n in list_models())


@pytest.mark.parametrize("kw", [{"num_classes": 0}, {"num_classes": 10, "head_dim": -1},
                                {"num_classes": True}])
def test_create_model_rejects_bad_sizes(kw):
    with pytest.raises(ValueError, match="must be a positive int"):
        create_model("small_cnn", **kw)


class _Tiny(Encoder):
    last_stage = ("fc.",)

    def __init__(self):
        super().__init__()
        self.fc, self.feat_dim = nn.Linear(3, 4), 4

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_register_model_enrolls_and_warns_on_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "_model_entrypoints", dict(registry._model_entrypoints))
    monkeypatch.setattr(registry, "_model_to_module", dict(registry._model_to_module))

    def tiny_test_net(*, pretrained=None, freeze_early=False):
        return _Tiny()
    register_model(tiny_test_net)
    assert "tiny_test_net" in list_models()
    net = create_model("tiny_test_net", num_classes=3, head_dim=2)
    assert net(torch.randn(1, 3, 28, 28))["projection"].shape == (1, 2)
    with pytest.warns(UserWarning, match="registered twice"):
        register_model(tiny_test_net)


# --- model_args / build_from_args -------------------------------------------------------------

@pytest.mark.parametrize("with_classifier", [False, True])
def test_model_args_roundtrip(with_classifier):
    torch.manual_seed(1)
    net = create_model("small_cnn", num_classes=7, head_dim=32, with_classifier=with_classifier)
    args = model_args(net)
    assert args == {"arch": "small_cnn", "num_classes": 7, "head_dim": 32,
                    "with_classifier": with_classifier}
    rebuilt = build_from_args(args)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    net.eval(), rebuilt.eval()
    for k, v in net(x).items():
        torch.testing.assert_close(rebuilt(x)[k], v)


@pytest.mark.parametrize("args, field", [
    ({"num_classes": 10}, "model_args.arch"),
    ({"arch": "nope", "num_classes": 10}, "model_args.arch"),
    ({"arch": "small_cnn"}, "model_args.num_classes"),
    ({"arch": "small_cnn", "num_classes": "10"}, "model_args.num_classes"),
    ({"arch": "small_cnn", "num_classes": 10, "head_dim": 0}, "model_args.head_dim"),
    ({"arch": "small_cnn", "num_classes": 10, "with_classifier": 1}, "model_args.with_classifier"),
    (["small_cnn"], "model_args"),
])
def test_build_from_args_names_the_bad_field(args, field):
    with pytest.raises(CheckpointError) as e:
        build_from_args(args)
    assert e.value.field == field


def test_model_args_of_hand_built_net_raises():
    with pytest.raises(ValueError, match="create_model"):
        model_args(EmbeddingNet(_Tiny(), 4))


# --- pretrained weights (local files only) ----------------------------------------------------

def test_resnet50_loads_torchvision_state_dict(tmp_path):
    from torchvision.models import resnet50
    torch.manual_seed(3)
    state = resnet50(weights=None).state_dict()  # torchvision format, fc.* included
    path = tmp_path / "resnet50_tv.pth"
    torch.save(state, path)
    net = create_model("resnet50", num_classes=100, pretrained=str(path), freeze_early=True)
    got = net.encoder.state_dict()
    assert set(got) == {k for k in state if not k.startswith("fc.")}
    for k in ("conv1.weight", "layer4.2.conv3.weight", "layer2.0.bn1.running_var"):
        torch.testing.assert_close(got[k], state[k], atol=0, rtol=0)


def test_pretrained_wrong_keys_and_shapes_name_the_path(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(create_model("small_cnn", num_classes=2).encoder.state_dict(), path)
    with pytest.raises(CheckpointError, match="missing keys") as e:
        create_model("resnet50", num_classes=10, pretrained=str(path))
    assert e.value.path == str(path) and "unexpected keys" in str(e.value)
    state = ResNet50Encoder().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): conv1.weight"):
        create_model("resnet50", num_classes=10, pretrained=str(path))


def test_pretrained_missing_or_unreadable_file_raises(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match="not found.*download") as e:
        create_model("resnet50", num_classes=10, pretrained=str(missing))
    assert str(missing) in str(e.value)
    with pytest.raises(CheckpointError, match="never downloaded.*download"):
        create_model("resnet50", num_classes=10, pretrained="imagenet")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a PyTorch weights file") as e:
        create_model("small_cnn", num_classes=10, pretrained=str(junk))
    assert e.value.path == str(junk)
    torch.save([torch.zeros(1)], junk)
    with pytest.raises(CheckpointError, match="expected a PyTorch state dict.*got a list"):
        create_model("small_cnn", num_classes=10, pretrained=str(junk))
    with pytest.raises(CheckpointError, match="expected a path"):
        create_model("small_cnn", num_classes=10, pretrained=123)


# --- ONNX export smoke test (thorough parity lives in tests/exporter) -------------------------

@pytest.mark.parametrize("dynamo, opset", [(False, 17),
                                           pytest.param(True, 18, marks=pytest.mark.slow)])
def test_deploy_model_exports_to_onnx_with_dynamic_batch(dynamo, opset, nets, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    dm = DeployModel(nets["small_cnn"], MEAN, STD).eval()
    path = tmp_path / "m.onnx"
    kw = ({"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamo else
          {"dynamic_axes": {"image": {0: "batch"}, "feature": {0: "batch"},
                            "projection": {0: "batch"}}})
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter's notice
        torch.onnx.export(dm, (torch.zeros(2, 32, 32, 3, dtype=torch.uint8),), str(path),
                          input_names=["image"], output_names=["feature", "projection"],
                          opset_version=opset, dynamo=dynamo, **kw)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    feature, projection = session.run(["feature", "projection"], {"image": images})
    with torch.no_grad():
        ref = dm(torch.from_numpy(images))
    np.testing.assert_allclose(feature, ref[0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(projection, ref[1].numpy(), atol=1e-4, rtol=0)
