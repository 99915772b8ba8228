"""trainer/losses.py: loop-based float64 references, gradcheck, edge cases, the registry."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import losses
from trainer.losses import (
    CrossEntropyLoss,
    ReweightOODLoss,
    SupConLoss,
    create_loss,
    list_losses,
    register_loss,
)

HPARAMS = {"temperature": 0.07, "m_b": 5.0, "c_b": -2.0, "m_w": 2.0, "c_w": -1.0}
SETTINGS = [  # (m_b, c_b, m_w, c_w, temperature, weighted)
    (5.0, -4.0, 2.0, -1.0, 0.1, True),    # CIFAR-10 / ImageNet-100 defaults
    (5.0, -2.0, 2.0, -1.0, 0.1, True),    # CIFAR-100
    (5.0, -4.0, 2.0, 1.0, 0.05, True),    # the paper's printed c_w = +1, low temperature
    (3.0, 0.5, 1.0, 0.0, 0.2, True),      # arbitrary
    (5.0, -4.0, 2.0, -1.0, 0.1, False),   # unweighted baseline
]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- loop references (float64)

def _rows(features: torch.Tensor, labels: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    b, v, _ = features.shape
    rows = [features[i, k] / features[i, k].norm() for k in range(v) for i in range(b)]
    return rows, [int(labels[i]) for k in range(v) for i in range(b)]


def ref_reweightood(features, labels, m_b=5.0, c_b=-4.0, m_w=2.0, c_w=-1.0, temperature=0.1,
                    weighted=True, detach_weights=True):
    """DESIGN.md section 1 literally: python loop over pairs i < j; empty terms dropped."""
    rows, ys = _rows(features, labels)
    pos, neg = [], []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            s = torch.dot(rows[i], rows[j])
            sw = s.detach() if detach_weights else s
            if ys[i] == ys[j]:
                w = torch.sigmoid(-(m_w * sw + c_w)) if weighted else 1.0
                pos.append(-w * s / temperature)
            else:
                w = torch.sigmoid(m_b * sw + c_b) if weighted else 1.0
                neg.append(w * s / temperature)
    total = features.sum() * 0
    for terms in (pos, neg):
        if terms:
            total = total + torch.logsumexp(torch.stack(terms), dim=0)
    return F.elu(total)


def ref_supcon(features, labels, temperature=0.1):
    """Khosla et al. eq. 2, loop over anchors; anchors without a positive are skipped."""
    rows, ys = _rows(features, labels)
    per_anchor = []
    for i in range(len(rows)):
        others = [a for a in range(len(rows)) if a != i]
        positives = [p for p in others if ys[p] == ys[i]]
        if not positives:
            continue
        denom = torch.logsumexp(torch.stack([rows[i] @ rows[a] / temperature for a in others]), 0)
        per_anchor.append(-sum(rows[i] @ rows[p] / temperature - denom for p in positives)
                          / len(positives))
    return sum(per_anchor) / len(per_anchor) if per_anchor else features.sum() * 0


def _value_and_grad(fn, features, labels):
    x = features.detach().clone().requires_grad_(True)
    out = fn(x, labels)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


def _assert_matches(fn, ref, features, labels, rtol=1e-9, atol=1e-10):
    out, g = _value_and_grad(fn, features, labels)
    ref_out, ref_g = _value_and_grad(ref, features, labels)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(g, ref_g, rtol=rtol, atol=atol)


def _batch(b=6, v=2, d=5, n_classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, v, d, generator=g, dtype=dtype),
            torch.randint(0, n_classes, (b,), generator=g))


# ---------------------------------------------------------------- registry

def test_registered_names():
    assert list_losses() == ["ce", "reweightood", "supcon", "unweighted"]


def test_create_loss_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'reweight'.*valid names: ce, reweightood, supcon, "
                                         r"unweighted"):
        create_loss("reweight")


@pytest.mark.parametrize("name", list_losses())
def test_create_loss_takes_full_hyperparameter_set(name):
    loss = create_loss(name, **HPARAMS)
    assert isinstance(loss, nn.Module)
    assert loss.input in ("projection", "logits")
    assert loss.n_views == (1 if loss.input == "logits" else 2)
    if hasattr(loss, "temperature"):
        assert loss.temperature == HPARAMS["temperature"]


def test_create_loss_passes_hyperparameters_through():
    rw = create_loss("reweightood", **HPARAMS)
    assert (rw.m_b, rw.c_b, rw.m_w, rw.c_w, rw.weighted) == (5.0, -2.0, 2.0, -1.0, True)
    assert create_loss("unweighted", **HPARAMS).weighted is False
    default = create_loss("reweightood")
    assert (default.m_b, default.c_b, default.m_w, default.c_w, default.temperature) == \
        (5.0, -4.0, 2.0, -1.0, 0.1)


def test_register_loss_warns_on_duplicate(monkeypatch):
    monkeypatch.setattr(losses, "_loss_entrypoints", dict(losses._loss_entrypoints))

    def supcon(temperature: float = 0.1) -> nn.Module:
        return SupConLoss(temperature)

    with pytest.warns(UserWarning, match="'supcon' is registered twice"):
        register_loss(supcon)
    assert create_loss("supcon") is not None


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"m_b": float("inf")}, "m_b"),
    ({"c_w": "1"}, "c_w"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReweightOODLoss(**kwargs)
    if "temperature" in kwargs:
        with pytest.raises(ValueError, match=match):
            SupConLoss(**kwargs)


@pytest.mark.parametrize("name", list_losses())
def test_bad_inputs_raise(name):
    loss = create_loss(name)
    feats, labels = _batch(b=4, d=5)
    with pytest.raises(ValueError, match=r"features must have shape \[B, V, D\]"):
        loss(feats[:, 0], labels)
    with pytest.raises(ValueError, match=r"features must have shape"):
        loss(feats[:0], labels[:0])
    with pytest.raises(TypeError, match="features must be a floating-point tensor"):
        loss(feats.long(), labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        loss(feats, labels.double())
    with pytest.raises(ValueError, match=r"labels must have shape \[B\] = \[4\]"):
        loss(feats, labels[:3])


# ---------------------------------------------------------------- generic properties

@pytest.mark.parametrize("name", list_losses())
def test_scalar_with_finite_gradient(name):
    loss = create_loss(name)
    feats, labels = _batch(b=8, v=loss.n_views, d=7, dtype=torch.float32)
    feats.requires_grad_(True)
    out = loss(feats, labels)
    out.backward()
    assert out.shape == () and out.dtype == torch.float32 and torch.isfinite(out)
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_losses())
def test_gradcheck_float64(name):
    # Finite differences see the weights move with s, autograd (rightly) does not, so for
    # reweightood use slopes m = 0: weights are then constants != 1 and the two must agree. The
    # weights' slope is checked against the loop reference (detached) below.
    loss = create_loss(name, m_b=0.0, c_b=-1.0, m_w=0.0, c_w=0.5)
    feats, labels = _batch(b=4, v=2, d=5, n_classes=2, seed=3)
    assert torch.autograd.gradcheck(lambda f: loss(f, labels), (feats.requires_grad_(True),))


@pytest.mark.parametrize("name", list_losses())
def test_batch_permutation_invariance(name):
    loss = create_loss(name)
    feats, labels = _batch(b=10, v=2, d=6, n_classes=4, seed=1)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss(feats[perm], labels[perm]), loss(feats, labels),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss(feats.flip(1), labels), loss(feats, labels),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("name", list_losses())
@pytest.mark.parametrize("layout", ["identical", "antipodal"])
def test_no_nan_at_low_temperature(name, layout):
    loss = create_loss(name, temperature=0.05)
    v = torch.randn(16)
    sign = torch.ones(12, 1, 1) if layout == "identical" else \
        torch.tensor([1.0, -1.0]).repeat(6).view(12, 1, 1)
    feats = (sign * v).expand(12, 2, 16).clone().requires_grad_(True)
    labels = torch.arange(12) % 3
    with torch.autograd.detect_anomaly():
        out = loss(feats, labels)
        out.backward()
    assert torch.isfinite(out) and torch.isfinite(feats.grad).all()


@pytest.mark.parametrize("name", ["reweightood", "unweighted", "supcon"])
def test_contrastive_dtypes(name):
    loss = create_loss(name)
    feats, labels = _batch(b=4, d=8)
    assert loss(feats, labels).dtype == torch.float64
    out16 = loss(feats.half(), labels)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, loss(feats.half().float(), labels))


# ---------------------------------------------------------------- ReweightOOD vs reference

@pytest.mark.parametrize("m_b, c_b, m_w, c_w, temperature, weighted", SETTINGS)
def test_reweightood_matches_loop_reference(m_b, c_b, m_w, c_w, temperature, weighted):
    kw = {"m_b": m_b, "c_b": c_b, "m_w": m_w, "c_w": c_w, "temperature": temperature,
          "weighted": weighted}
    loss = ReweightOODLoss(**kw)
    for seed, (b, v, n_classes) in enumerate([(6, 2, 3), (9, 2, 2), (5, 3, 4)]):
        feats, labels = _batch(b=b, v=v, d=5, n_classes=n_classes, seed=seed)
        _assert_matches(loss, lambda f, y, kw=kw: ref_reweightood(f, y, **kw), feats, labels)


def test_factories_match_their_modules():
    feats, labels = _batch(b=6, d=5)
    torch.testing.assert_close(create_loss("unweighted", temperature=0.2)(feats, labels),
                               ReweightOODLoss(temperature=0.2, weighted=False)(feats, labels))
    torch.testing.assert_close(create_loss("reweightood", **HPARAMS)(feats, labels),
                               ReweightOODLoss(**HPARAMS)(feats, labels))


def _cifar_features(cifar10_small, n=12):
    """Two 'views' of real CIFAR-10 images: centred pixels and their h-flip, [n, 2, 3072]."""
    x = torch.from_numpy(cifar10_small["images"][:n].astype(np.float64) / 255.0 - 0.5)
    views = torch.stack([x, x.flip(2)], dim=1)                      # flip W of [n, H, W, C]
    return views.reshape(n, 2, -1), torch.from_numpy(cifar10_small["labels"][:n])


@pytest.mark.cifar_pack
def test_losses_match_references_on_real_cifar(cifar10_small):
    feats, labels = _cifar_features(cifar10_small)
    assert len(set(labels.tolist())) > 1
    for m_b, c_b, m_w, c_w, tau, weighted in SETTINGS[:2]:        # CIFAR-10 and CIFAR-100
        kw = {"m_b": m_b, "c_b": c_b, "m_w": m_w, "c_w": c_w, "temperature": tau,
              "weighted": weighted}
        _assert_matches(ReweightOODLoss(**kw), lambda f, y, kw=kw: ref_reweightood(f, y, **kw),
                        feats, labels)
    _assert_matches(SupConLoss(0.1), ref_supcon, feats, labels)


def test_weights_carry_no_gradient():
    loss = ReweightOODLoss(c_b=-2.0)
    feats, labels = _batch(b=8, d=5, seed=4)
    _, g = _value_and_grad(loss, feats, labels)
    _, g_detached = _value_and_grad(
        lambda f, y: ref_reweightood(f, y, c_b=-2.0, detach_weights=True), feats, labels)
    _, g_through = _value_and_grad(
        lambda f, y: ref_reweightood(f, y, c_b=-2.0, detach_weights=False), feats, labels)
    torch.testing.assert_close(g, g_detached, rtol=1e-9, atol=1e-10)
    assert (g - g_through).abs().max() > 1e-3     # differentiating through w would change it


def test_single_sample_classes():
    feats, labels = _batch(b=7, d=5, seed=5)
    labels = torch.arange(7)                       # positives are only the two views of an image
    _assert_matches(ReweightOODLoss(), ref_reweightood, feats, labels)
    _assert_matches(SupConLoss(), ref_supcon, feats, labels)


def test_all_one_class_drops_negative_term():
    feats, _ = _batch(b=5, d=5, seed=6)
    labels = torch.zeros(5, dtype=torch.long)
    loss = ReweightOODLoss()
    z = F.normalize(torch.cat(torch.unbind(feats, 1)), dim=1)
    s = (z @ z.T)[tuple(torch.triu_indices(10, 10, 1))]
    expected = F.elu(torch.logsumexp(-torch.sigmoid(-(2.0 * s - 1.0)) * s / 0.1, 0))
    torch.testing.assert_close(loss(feats, labels), expected)
    _assert_matches(loss, ref_reweightood, feats, labels)
    _assert_matches(SupConLoss(), ref_supcon, feats, labels)


def test_no_positive_pair_drops_positive_term():
    feats, _ = _batch(b=6, v=1, d=5, seed=7)
    labels = torch.arange(6)
    _assert_matches(ReweightOODLoss(), ref_reweightood, feats, labels)
    z = F.normalize(feats[:, 0], dim=1)
    s = (z @ z.T)[tuple(torch.triu_indices(6, 6, 1))]
    expected = F.elu(torch.logsumexp(torch.sigmoid(5.0 * s - 4.0) * s / 0.1, 0))
    torch.testing.assert_close(ReweightOODLoss()(feats, labels), expected)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("name", ["reweightood", "unweighted", "supcon"])
def test_no_pair_at_all_gives_zero(name):
    feats = torch.randn(1, 1, 5, requires_grad=True)
    with torch.autograd.detect_anomaly():
        out = create_loss(name)(feats, torch.zeros(1, dtype=torch.long))
        out.backward()
    assert out.item() == 0.0 and torch.equal(feats.grad, torch.zeros_like(feats))


# ---------------------------------------------------------------- SupCon and CE

@pytest.mark.parametrize("b, v, n_classes, temperature", [(6, 2, 3, 0.1), (8, 2, 2, 0.05),
                                                          (5, 3, 4, 0.5), (7, 1, 5, 0.1)])
def test_supcon_matches_loop_reference(b, v, n_classes, temperature):
    feats, labels = _batch(b=b, v=v, d=5, n_classes=n_classes, seed=b)
    _assert_matches(SupConLoss(temperature), lambda f, y: ref_supcon(f, y, temperature),
                    feats, labels)


def test_supcon_excludes_anchors_without_positive():
    feats, _ = _batch(b=5, v=1, d=4, seed=9)
    labels = torch.tensor([0, 0, 1, 2, 3])       # only the two class-0 rows are anchors
    full = SupConLoss()(feats, labels)
    torch.testing.assert_close(full, ref_supcon(feats, labels))
    z = F.normalize(feats[:, 0], dim=1)
    logits = z @ z.T / 0.1
    lse = [torch.logsumexp(torch.cat([logits[i, :i], logits[i, i + 1:]]), 0) for i in (0, 1)]
    expected = -((logits[0, 1] - lse[0]) + (logits[1, 0] - lse[1])) / 2
    torch.testing.assert_close(full, expected)


@pytest.mark.parametrize("v", [1, 2])
def test_ce_matches_cross_entropy(v):
    logits, labels = _batch(b=9, v=v, d=4, n_classes=4, seed=10)
    loss = create_loss("ce")
    expected = F.cross_entropy(logits.reshape(9 * v, 4), labels.repeat_interleave(v))
    torch.testing.assert_close(loss(logits, labels), expected)
    if v == 1:
        torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits[:, 0], labels))
    assert math.isclose(CrossEntropyLoss()(logits, labels).item(), expected.item())
