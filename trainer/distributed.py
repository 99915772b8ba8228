"""Helpers for `torchrun` data-parallel training: who am I, set-up/tear-down, global-batch gathers.

Use `init_distributed()` once at start (a no-op returning a single-process `DistInfo` when `RANK`
is unset, so the same script runs with and without torchrun), `gather_with_grad` / `gather_no_grad`
to build the global batch a batch-level loss needs, and `cleanup()` at exit.
Tests: tests/trainer/test_distributed.py.

Gradient convention (what `gather_with_grad` does in backward, and what the training loop does):
every rank computes the SAME loss L on the gathered global batch. The backward of the gather is the
true adjoint of all-gather: each rank's shard receives the SUM over ranks of the gradients flowing
into that shard's slice of the gathered tensor, i.e. world_size * dL/d(shard). DDP then averages
parameter gradients over ranks (divides by world_size), so the result is exactly the gradient of L
on the concatenated batch, as a single process would compute it. No manual loss scaling: call
`loss.backward()` on the un-scaled loss. (A gather that only returned each rank's own slice would
need the loss multiplied by world_size before DDP's mean; we do not use that convention.)
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup", "gather_with_grad", "gather_no_grad"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: global rank, rank on its node, number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistInfo:
        """Read RANK, WORLD_SIZE and LOCAL_RANK as set by torchrun (single process if RANK unset).

        Raises:
            ValueError: a variable that is not an int, or ranks outside [0, WORLD_SIZE).
        """
        env = os.environ if env is None else env
        if "RANK" not in env:
            return cls()
        values = {}
        for var, default in (("RANK", None), ("WORLD_SIZE", None), ("LOCAL_RANK", "0")):
            raw = env.get(var, default)
            try:
                values[var] = int(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"environment variable {var} must be an int when RANK is set, "
                                 f"got {raw!r}") from None
        rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
        if world < 1 or not 0 <= rank < world or not 0 <= local < world:
            raise ValueError(f"need 0 <= RANK, LOCAL_RANK < WORLD_SIZE, got RANK={rank}, "
                             f"LOCAL_RANK={local}, WORLD_SIZE={world}")
        return cls(rank=rank, local_rank=local, world_size=world)


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the torchrun process group described by the environment; return this process's info.

    Args:
        backend: "nccl" (GPUs) or "gloo" (CPU); None picks nccl when CUDA is available, else gloo.
    With nccl the current CUDA device is set to LOCAL_RANK. Without RANK in the environment nothing
    is initialised and `DistInfo()` (rank 0 of 1) is returned. Rendezvous uses env:// (MASTER_ADDR,
    MASTER_PORT, set by torchrun). Calling it again once initialised just returns the info.
    """
    info = DistInfo.from_env()
    if not info.is_distributed or (dist.is_available() and dist.is_initialized()):
        return info
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank,
                            world_size=info.world_size)
    return info


def cleanup() -> None:
    """Leave the process group if one was initialised (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward is its adjoint: all-reduce SUM, keep own slice.

    Written out rather than using torch.distributed.nn.functional.all_gather: that one has the
    same SUM semantics (its backward is a reduce-scatter) but is deprecated in torch 2.14 with a
    FutureWarning. The list all_gather and all_reduce used here work on gloo and nccl without
    deprecation warnings in 2.14 (all_gather_into_tensor / reduce_scatter_tensor warn there), so
    backward is all_reduce + slice rather than a reduce-scatter; the tensor is one global batch of
    embeddings, so the extra volume is negligible.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.b = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0, keeping the graph to this rank's shard.

    Args:
        x: [b, ...] with the same shape, dtype and device on every rank (use drop_last=True);
           on the GPU for nccl, on the CPU for gloo.
    Returns:
        [world_size * b, ...], rank r's shard at rows [r*b, (r+1)*b). In backward the shard gets
        the sum over ranks of its rows' gradients (see the module docstring for why no loss
        scaling is needed under DDP). Identity when no process group is initialised.
    Every rank must call it, in the same order (it is a collective, forward and backward).

    Raises:
        ValueError: `x` is 0-dimensional.
    """
    if x.dim() < 1:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    if _active_world() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Like `gather_with_grad` but without autograd: for labels (int64 [b] -> [world_size * b]).

    Identity when no process group is initialised. Every rank must call it.

    Raises:
        ValueError: `x` is 0-dimensional.
    """
    if x.dim() < 1:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    if _active_world() == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)
