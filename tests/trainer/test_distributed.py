"""trainer/distributed.py: env parsing, and exact global-batch gradients over 2 gloo processes.

The 2-process test runs the recipe train.py follows (gather features with grad and labels without,
loss on the global batch, un-scaled backward, DDP mean) and checks every rank's parameter gradient
against one process on the concatenated batch, for two SGD steps.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from trainer.distributed import DistInfo, cleanup, gather_no_grad, gather_with_grad, init_distributed
from trainer.losses import create_loss

WORLD, B, D = 2, 8, 6  # processes, global batch, projection width
STEPS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- single process

def test_dist_info_single_process_without_rank():
    assert DistInfo.from_env({}) == DistInfo(rank=0, local_rank=0, world_size=1)
    info = DistInfo.from_env({"WORLD_SIZE": "4"})      # RANK unset: not a torchrun process
    assert info.is_main and not info.is_distributed


def test_dist_info_from_torchrun_env():
    info = DistInfo.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert not info.is_main and info.is_distributed
    assert DistInfo.from_env({"RANK": "0", "WORLD_SIZE": "2"}).local_rank == 0


@pytest.mark.parametrize("env, match", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK must be an int"),
    ({"RANK": "0"}, "WORLD_SIZE must be an int"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "0 <= RANK, LOCAL_RANK < WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "0 <= RANK, LOCAL_RANK < WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK"),
])
def test_dist_info_bad_env_raises(env, match):
    with pytest.raises(ValueError, match=match):
        DistInfo.from_env(env)


def test_single_process_helpers_are_identity(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert init_distributed("gloo") == DistInfo()
    assert not torch.distributed.is_initialized()
    x, y = torch.randn(3, 2, requires_grad=True), torch.arange(3)
    assert gather_with_grad(x) is x and gather_no_grad(y) is y
    cleanup()                                            # safe without a process group
    with pytest.raises(ValueError, match="batch dimension"):
        gather_with_grad(torch.tensor(1.0))
    with pytest.raises(ValueError, match="batch dimension"):
        gather_no_grad(torch.tensor(1))


# ---------------------------------------------------------------- two gloo processes

class _TinyNet(nn.Module):
    """Conv encoder, projection head and optional classifier, like EmbeddingNet (no BatchNorm:
    per-rank batch statistics would differ from single-process ones by design)."""

    def __init__(self, with_classifier: bool = False):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                     nn.Flatten())
        self.head = nn.Linear(16, D)
        self.classifier = nn.Linear(16, 3) if with_classifier else None

    def forward(self, x):
        f = self.encoder(x)
        out = {"projection": self.head(f)}
        if self.classifier is not None:
            out["logits"] = self.classifier(f)
        return out


def _net(state: dict, with_classifier: bool) -> _TinyNet:
    """A float64 _TinyNet with the shared initial weights (classifier only when asked)."""
    net = _TinyNet(with_classifier).double()
    net.load_state_dict({k: v for k, v in state.items()
                         if with_classifier or not k.startswith("classifier.")})
    return net


def _views(x: torch.Tensor) -> torch.Tensor:
    """Two deterministic 'augmentations' [b, 3, H, W] -> [2*b, ...] view-major, as train.py."""
    return torch.cat([x, x.flip(3)])


def _features(model: nn.Module, x: torch.Tensor, key: str, n_views: int) -> torch.Tensor:
    out = model(_views(x)[: n_views * len(x)])[key]                 # [V*b, D]
    return out.view(n_views, len(x), -1).transpose(0, 1)             # [b, V, D]


def _run(model, params, loss_fn, x, y, gather: bool, lr: float = 0.5):
    """STEPS plain SGD steps; returns [(loss, [param grads])] per step. (The update is written out:
    torch.optim's constructor imports torch._dynamo, seconds of CPU in a fresh process.)"""
    trace = []
    for _ in range(STEPS):
        feats = _features(model, x, loss_fn.input, loss_fn.n_views)
        yy = y
        if gather:
            feats, yy = gather_with_grad(feats), gather_no_grad(y)
        loss = loss_fn(feats, yy)
        for p in params:
            p.grad = None
        loss.backward()
        trace.append((loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                      for p in params]))
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= lr * p.grad
    return trace


def _worker(rank: int, port: int, out_dir: str, x: torch.Tensor, y: torch.Tensor, state: dict):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("gloo")
    try:
        b = len(x) // WORLD
        xs, ys = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
        result = {"info": info, "labels": gather_no_grad(ys)}
        for name in ("reweightood", "ce"):
            loss_fn = create_loss(name, temperature=0.1, m_b=5.0, c_b=-2.0, m_w=2.0, c_w=-1.0)
            net = _net(state, with_classifier=loss_fn.input == "logits")   # as train.py
            params = [p for p in net.parameters() if p.requires_grad]
            # ce never uses the head: without find_unused_parameters (or a frozen head) DDP
            # raises "Expected to have finished reduction" at the second step
            ddp = nn.parallel.DistributedDataParallel(
                net, find_unused_parameters=loss_fn.input != "projection")
            result[name] = _run(ddp, params, loss_fn, xs, ys, gather=True)
        plain = _net(state, with_classifier=False)       # no DDP: raw grads before averaging
        result["raw"] = _run(plain, list(plain.parameters()), create_loss("reweightood", c_b=-2.0),
                             xs, ys, gather=True)[0]
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(B, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0])
    state = _TinyNet(with_classifier=True).double().state_dict()
    out = tmp_path_factory.mktemp("ddp")
    # forkserver: torch and the torch._dynamo that DDP's constructor imports (~4 s CPU) are
    # imported once, in the server, instead of once per rank as with spawn (this is most of the
    # test's time). A server already started elsewhere without the preload only costs time.
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch._dynamo", __name__])
    mp.start_processes(_worker, args=(_free_port(), str(out), x, y, state), nprocs=WORLD,
                       join=True, start_method="forkserver")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return x, y, state, results


def _reference(x, y, state, name):
    loss_fn = create_loss(name, temperature=0.1, m_b=5.0, c_b=-2.0, m_w=2.0, c_w=-1.0)
    net = _net(state, with_classifier=loss_fn.input == "logits")
    return _run(net, list(net.parameters()), loss_fn, x, y, gather=False)


def test_two_ranks_see_the_global_batch(two_rank_results):
    _, y, _, results = two_rank_results
    for rank, res in enumerate(results):
        assert res["info"] == DistInfo(rank=rank, local_rank=rank, world_size=WORLD)
        assert torch.equal(res["labels"], y)


@pytest.mark.parametrize("name", ["reweightood", "ce"])
def test_ddp_gradient_equals_single_process(two_rank_results, name):
    x, y, state, results = two_rank_results
    ref = _reference(x, y, state, name)
    for res in results:
        for (loss, grads), (ref_loss, ref_grads) in zip(res[name], ref):
            torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
            for g, rg in zip(grads, ref_grads):
                torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in ref[-1][1])


def test_raw_rank_gradients_average_to_global_gradient(two_rank_results):
    """Without DDP: rank r holds world * (its shard's share); the mean over ranks is exact, and
    no single rank's gradient is, so the DDP mean (not a sum, not a x world scaling) is needed."""
    x, y, state, results = two_rank_results
    (_, ref_grads), = _reference(x, y, state, "reweightood")[:1]
    raw = [res["raw"][1] for res in results]
    for i, rg in enumerate(ref_grads):
        torch.testing.assert_close(sum(r[i] for r in raw) / WORLD, rg, rtol=1e-5, atol=1e-10)
    assert not torch.allclose(raw[0][0], ref_grads[0], rtol=1e-3)
