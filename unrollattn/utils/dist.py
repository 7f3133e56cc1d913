"""Where this process sits among torchrun ranks, and the collectives every layer may use.

Nothing here creates or joins a process group (that is :func:`unrollattn.train.distributed.init_distributed`);
without one every collective is a no-op and the process is rank 0 of a world of one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistState", "all_gather_object", "all_reduce_mean", "all_reduce_sum", "all_reduce_tensor", "barrier",
    "broadcast_object", "env_int", "group_active", "has_sharded_parameters", "is_main_process", "main_rank_only",
    "global_batch_seed", "micro_batch_size", "micro_batch_slice", "raise_if_any_rank_failed", "run_on_main", "step_seed",
    "unwrap_model",
]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistState:
    """Where this process sits: its rank, the world size and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1


def env_int(name: str) -> int | None:
    """The integer value of environment variable ``name`` (None when unset or empty)."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def is_main_process(state: DistState | None = None) -> bool:
    """True on rank 0: ``state.is_main`` when a state is given, else the torchrun ``RANK`` variable (unset: rank 0)."""
    if state is not None:
        return state.is_main
    return (env_int("RANK") or 0) == 0


def group_active(state: DistState) -> bool:
    """True when ``state`` is one rank of an initialized process group of more than one rank."""
    return state.distributed and dist.is_available() and dist.is_initialized()


def _comm_device(state: DistState) -> torch.device:
    # nccl only reduces CUDA tensors; gloo takes CPU tensors.
    return state.device if state.backend == "nccl" else torch.device("cpu")


def _scalar_tensor(value: float | torch.Tensor, state: DistState) -> torch.Tensor:
    # float64 keeps sums of floats exact enough.
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a scalar (one element), got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(device=_comm_device(state), dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=_comm_device(state))


def all_reduce_sum(value: float | torch.Tensor, state: DistState) -> float:
    """Sum of a scalar over all ranks (the value itself in a single process)."""
    t = _scalar_tensor(value, state)
    if group_active(state):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_reduce_mean(value: float | torch.Tensor, state: DistState) -> float:
    """Mean of a scalar over all ranks (the value itself in a single process)."""
    return all_reduce_sum(value, state) / (state.world_size if group_active(state) else 1)


def all_reduce_tensor(tensor: torch.Tensor, state: DistState, op: str = "sum") -> torch.Tensor:
    """Element-wise sum (or mean) of a tensor over ranks, returned as a new float64 CPU tensor."""
    if op not in ("sum", "mean"):
        raise ValueError(f"op: expected 'sum' or 'mean', got {op!r}")
    t = tensor.detach().to(device=_comm_device(state), dtype=torch.float64).clone()
    if group_active(state):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= state.world_size
    return t.cpu()


def broadcast_object(obj: Any, state: DistState, src: int = 0) -> Any:
    """Rank ``src``'s (picklable) ``obj`` on every rank; also acts as a barrier."""
    if not group_active(state):
        return obj
    box = [obj if state.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any, state: DistState) -> list[Any]:
    """Every rank's (picklable) ``obj``, in rank order (``[obj]`` in a single process)."""
    if not group_active(state):
        return [obj]
    gathered: list[Any] = [None] * state.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def raise_if_any_rank_failed(error: Exception | None, state: DistState, what: str) -> None:
    """Collective: re-raise this rank's ``error``, or raise RuntimeError on every rank when another rank failed
    (naming each failing rank), so that no rank goes on into a collective that a failed peer never reaches."""
    failures = all_gather_object(None if error is None else f"{type(error).__name__}: {error}", state)
    if error is not None:
        raise error
    failed = [f"rank {rank}: {message}" for rank, message in enumerate(failures) if message is not None]
    if failed:
        raise RuntimeError(f"{what} failed on another rank: " + "; ".join(failed))


def main_rank_only(state: DistState, action: Callable[[], T]) -> T:
    """Run ``action()`` on rank 0 only; every rank returns its result, or raises if it failed (rank 0 its own error,
    the others a RuntimeError naming it)."""
    result, error = None, None
    if state.is_main:
        try:
            result = action()
        except Exception as err:  # forwarded to the other ranks so that none waits forever
            error = err
    shared = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"), state)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise RuntimeError(f"rank 0 failed: {shared[1]}")
    return shared[0]


def barrier(state: DistState) -> None:
    if group_active(state):
        if state.backend == "nccl":
            dist.barrier(device_ids=[state.device.index])
        else:
            dist.barrier()


def run_on_main(state: DistState, action: Callable[[], T]) -> T:
    """Run ``action()`` on rank 0 first (e.g. preparing a corpus), then on the other ranks (which reuse its files).

    An exception on rank 0 is raised there and, as a RuntimeError naming it, on every other rank: no rank is left
    waiting at a collective.
    """
    result, error = None, None
    if state.is_main:
        try:
            result = action()
        except Exception as err:
            error = err
    failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", state)
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"rank 0 failed: {failed}")
    return result if state.is_main else action()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (whose state_dict has clean keys)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def has_sharded_parameters(model: nn.Module) -> bool:
    """Whether ``model`` holds DTensor parameters (sharded by FSDP2's ``fully_shard``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def micro_batch_size(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Items per micro-batch on one rank: ``batch_size // (world_size * grad_accum)`` (must divide evenly)."""
    for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    parts = world_size * grad_accum
    if batch_size % parts:
        raise ValueError(f"batch_size={batch_size} must be divisible by world_size * grad_accum = "
                         f"{world_size} * {grad_accum} = {parts}")
    return batch_size // parts


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one (seed, step, rank): a hash, so neighbouring steps get unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def micro_batch_slice(batch_size: int, grad_accum: int, world_size: int, micro: int, rank: int) -> slice:
    """Where micro-batch ``micro`` of ``rank`` sits in its step's global batch of ``batch_size`` items: chunk
    ``micro * world_size + rank`` of ``world_size * grad_accum`` equal chunks. Tasks draw the whole global batch from
    :func:`global_batch_seed` and keep this slice, so the batch of a step does not depend on how it is split over ranks
    and accumulation steps (a run resumed on another number of devices sees the same data)."""
    mb = micro_batch_size(batch_size, grad_accum, world_size)
    if not 0 <= micro < grad_accum:
        raise ValueError(f"micro: expected 0 <= micro < grad_accum={grad_accum}, got {micro!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank!r}")
    first = (micro * world_size + rank) * mb
    return slice(first, first + mb)


def global_batch_seed(seed: int, step: int) -> int:
    """The RNG seed of step ``step``'s global batch (the same on every rank; see :func:`micro_batch_slice`)."""
    return step_seed(seed, step, 0)
