"""Training losses behind a name registry: ReweightOOD, its unweighted baseline, SupCon, CE.

Use `create_loss(name, **hyperparameters)` wherever a loss is needed; the training loop passes its
full hyperparameter set and each factory takes only what its signature names. Every loss module
carries two class attributes the loop reads instead of checking names:

- `input`: which model output it consumes, "projection" (contrastive) or "logits" (ce);
- `n_views`: how many augmented views per image it expects (2 contrastive, 1 ce).

All losses share one call: `loss(features [B, V, D] float, labels [B] int64) -> scalar`. View v of
image b is `features[b, v]`. Contrastive losses L2-normalise the features themselves (idempotent
for unit rows) and concatenate the views view-major, as SupContrast does. Computation runs in the
input's dtype promoted to at least float32 (float64 stays float64, so gradcheck works), with
autocast disabled. Add a loss by decorating a factory with `@register_loss`; the tests parametrize
over `list_losses()`. Tests: tests/trainer/test_losses.py.
"""
from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReweightOODLoss", "SupConLoss", "CrossEntropyLoss", "register_loss", "create_loss",
           "list_losses"]

_log = logging.getLogger(__name__)
LossFn = Callable[..., nn.Module]
_loss_entrypoints: dict[str, LossFn] = {}  # name -> factory returning the loss module


def register_loss(fn: LossFn) -> LossFn:
    """Decorator: register a loss factory under its own `__name__` (warns on duplicates)."""
    name = fn.__name__
    if name in _loss_entrypoints:
        warnings.warn(f"loss {name!r} is registered twice ({_loss_entrypoints[name].__module__} "
                      f"and {fn.__module__}); the later one wins", stacklevel=2)
    _loss_entrypoints[name] = fn
    return fn


def list_losses() -> list[str]:
    """Sorted names of all registered losses."""
    return sorted(_loss_entrypoints)


def create_loss(name: str, **kwargs: float) -> nn.Module:
    """Build the loss registered as `name`, passing only the kwargs its factory accepts.

    The training loop can thus always pass its whole set {temperature, m_b, c_b, m_w, c_w}:
    `ce` ignores all of them, `supcon`/`unweighted` use only `temperature`. Ignored keys are
    logged at DEBUG level (a misspelt key is ignored too, so check names against the factory).

    Raises:
        ValueError: unknown `name` (the message lists the valid ones), or a bad hyperparameter.

    Examples:
        >>> loss = create_loss("reweightood", temperature=0.1, m_b=5.0, c_b=-2.0, m_w=2.0, c_w=-1.0)
        >>> loss.input, loss.n_views
        ('projection', 2)
        >>> create_loss("ce", temperature=0.1).input
        'logits'
    """
    if name not in _loss_entrypoints:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(list_losses())}")
    fn = _loss_entrypoints[name]
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    used = {k: v for k, v in kwargs.items() if k in params}
    if len(used) < len(kwargs):
        _log.debug("loss %r ignores %s", name, sorted(set(kwargs) - set(used)))
    return fn(**used)


def _check_inputs(features: torch.Tensor, labels: torch.Tensor) -> None:
    """ValueError/TypeError naming the argument unless features [B, V, D] float, labels [B] int."""
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got "
                        f"{getattr(features, 'dtype', type(features).__name__)}")
    if features.dim() != 3 or min(features.shape) < 1:
        raise ValueError(f"features must have shape [B, V, D] with B, V, D >= 1, got "
                         f"{tuple(features.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels must have shape [B] = [{features.shape[0]}], got "
                         f"{tuple(labels.shape)}")


def _check_temperature(temperature: float) -> float:
    ok = isinstance(temperature, (int, float)) and math.isfinite(temperature)
    if not (ok and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _views_to_rows(features: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, V, D], [B] -> unit rows z [V*B, D] (view-major: all first views, then all second) and
    their labels [V*B], in the input dtype promoted to at least float32."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    z = F.normalize(features.to(dtype), dim=-1)
    z = torch.cat(torch.unbind(z, dim=1), dim=0)
    return z, labels.repeat(features.shape[1])


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """logsumexp of x over the entries where mask is True; 0 where the set is empty.

    Masked entries are filled with the dtype's lowest finite value instead of -inf, so an empty set
    gives a finite forward and a zero, NaN-free gradient (anomaly detection stays quiet).
    """
    filled = x.masked_fill(~mask, torch.finfo(x.dtype).min)
    if dim is None:
        lse, any_ = torch.logsumexp(filled.flatten(), dim=0), mask.any()
    else:
        lse, any_ = torch.logsumexp(filled, dim=dim), mask.any(dim=dim)
    return torch.where(any_, lse, torch.zeros_like(lse))


class ReweightOODLoss(nn.Module):
    """ReweightOOD (Regmi et al., CVPR-W 2024): reweighted batch-level contrastive loss.

    With z the unit rows of all 2B views, S = z zᵀ and pairs i < j (strict upper triangle),
    P = same-label pairs (includes the two views of one image), N = different-label pairs:

        w_neg(s) = sigmoid(m_b * s + c_b)         (hard negatives, high s, weigh more)
        w_pos(s) = sigmoid(-(m_w * s + c_w))      (hard positives, low s, weigh more)
        L = ELU( logsumexp_P(-w_pos * s / tau) + logsumexp_N(w_neg * s / tau) )

    Weights are computed on detached similarities: no gradient flows through a weight.
    The positive term follows the authors' code, `+logsumexp(-w s / tau)`, not the paper's printed
    `-log sum exp(+w s / tau)`; it is the form that pulls the hardest positives, the paper's stated
    intent. Parameters use the paper's `T = m * s + c` convention; the paper prints c_w = +1, but
    the authors' code corresponds to c_w = -1, which produced the published numbers and is the
    default. Defaults are the CIFAR-10 / ImageNet-100 setting (m_b, c_b) = (5, -4); use
    (5, -2) for CIFAR-100; m_w = 2 throughout. `weighted=False` sets every weight to 1 (the
    paper's unweighted Baseline).

    Empty pair sets: a term whose set is empty is dropped (counts as 0) rather than taken as
    logsumexp(empty) = -inf. An all-one-class batch thus gives ELU(positive term) and a batch with
    no positive pair (V = 1, all labels distinct) gives ELU(negative term); with no pair at all
    (B * V = 1) the loss is 0 with a zero gradient. All of these are finite and NaN-free.
    """

    input = "projection"
    n_views = 2

    def __init__(self, m_b: float = 5.0, c_b: float = -4.0, m_w: float = 2.0, c_w: float = -1.0,
                 temperature: float = 0.1, weighted: bool = True):
        super().__init__()
        for name, v in (("m_b", m_b), ("c_b", c_b), ("m_w", m_w), ("c_w", c_w)):
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        self.m_b, self.c_b, self.m_w, self.c_w = float(m_b), float(c_b), float(m_w), float(c_w)
        self.temperature = _check_temperature(temperature)
        self.weighted = bool(weighted)

    def extra_repr(self) -> str:
        return (f"m_b={self.m_b}, c_b={self.c_b}, m_w={self.m_w}, c_w={self.c_w}, "
                f"temperature={self.temperature}, weighted={self.weighted}")

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: features float [B, V, D] (raw or unit projections), labels int [B].
        Returns: scalar loss (dtype of the features, at least float32)."""
        _check_inputs(features, labels)
        with torch.autocast(features.device.type, enabled=False):
            z, y = _views_to_rows(features, labels)                          # [N, D], [N]
            n = z.shape[0]
            s = z @ z.T                                                      # [N, N]
            upper = torch.ones(n, n, dtype=torch.bool, device=z.device).triu_(1)
            same = y[:, None] == y[None, :]
            pos, neg = upper & same, upper & ~same
            if self.weighted:
                sd = s.detach()
                w_pos = torch.sigmoid(-(self.m_w * sd + self.c_w))
                w_neg = torch.sigmoid(self.m_b * sd + self.c_b)
            else:
                w_pos = w_neg = torch.ones_like(s)
            pos_term = _masked_logsumexp(-w_pos * s / self.temperature, pos)
            neg_term = _masked_logsumexp(w_neg * s / self.temperature, neg)
            return F.elu(pos_term + neg_term)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, "L_out"), all views as anchors.

    For anchor i among the N = V*B unit rows, with A(i) = all rows but i and P(i) the rows in A(i)
    of the same label: loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p/tau) /
    sum_{a in A(i)} exp(z_i.z_a/tau) ); the loss is the mean of loss_i over anchors with |P(i)| >= 1
    (base_temperature = temperature, so no extra tau factor). Anchors without a positive (V = 1
    and a singleton label) are excluded from the mean; if no anchor has one, the loss is 0 with a
    zero gradient. NaN-free.
    """

    input = "projection"
    n_views = 2

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: features float [B, V, D] (raw or unit projections), labels int [B].
        Returns: scalar loss (dtype of the features, at least float32)."""
        _check_inputs(features, labels)
        with torch.autocast(features.device.type, enabled=False):
            z, y = _views_to_rows(features, labels)                          # [N, D], [N]
            logits = z @ z.T / self.temperature                              # [N, N]
            not_self = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
            pos = not_self & (y[:, None] == y[None, :])
            log_prob = logits - _masked_logsumexp(logits, not_self, dim=1)[:, None]
            n_pos = pos.sum(dim=1)
            mean_log_prob_pos = torch.where(pos, log_prob, 0.0).sum(dim=1) / n_pos.clamp(min=1)
            has_pos = n_pos > 0
            per_anchor = torch.where(has_pos, -mean_log_prob_pos, 0.0)
            return per_anchor.sum() / has_pos.sum().clamp(min=1)


class CrossEntropyLoss(nn.Module):
    """Cross-entropy baseline on classifier logits: mean over all B*V rows.

    Takes features = logits float [B, V, C] (V = 1 in training) and labels int [B] in [0, C).
    """

    input = "logits"
    n_views = 1

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: features (logits) float [B, V, C], labels int [B]. Returns: scalar loss."""
        _check_inputs(features, labels)
        b, v, c = features.shape
        return F.cross_entropy(features.reshape(b * v, c), labels.repeat_interleave(v))


@register_loss
def reweightood(m_b: float = 5.0, c_b: float = -4.0, m_w: float = 2.0, c_w: float = -1.0,
                temperature: float = 0.1) -> nn.Module:
    """ReweightOOD loss; defaults are CIFAR-10 (m_b, c_b = 5, -4); CIFAR-100 uses c_b = -2."""
    return ReweightOODLoss(m_b=m_b, c_b=c_b, m_w=m_w, c_w=c_w, temperature=temperature)


@register_loss
def unweighted(temperature: float = 0.1) -> nn.Module:
    """The paper's Baseline: the ReweightOOD loss with every weight equal to 1."""
    return ReweightOODLoss(temperature=temperature, weighted=False)


@register_loss
def supcon(temperature: float = 0.1) -> nn.Module:
    """SupCon (Khosla et al. 2020)."""
    return SupConLoss(temperature=temperature)


@register_loss
def ce() -> nn.Module:
    """Cross-entropy on classifier logits (the model needs a classifier)."""
    return CrossEntropyLoss()
