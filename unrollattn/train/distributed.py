"""torchrun + DDP plumbing: one process per device, gloo on CPU, nccl on CUDA.

Launch any recipe with ``torchrun --standalone --nproc_per_node=N -m unrollattn.recipes.<name> ...``; without
the torchrun environment (``RANK`` / ``WORLD_SIZE``) everything runs as a single process and every
collective here is a no-op.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistState", "all_reduce_mean", "all_reduce_sum", "barrier", "broadcast_object", "cleanup",
    "init_distributed", "resolve_device", "unwrap_model", "wrap_model",
]


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


_STATE: DistState | None = None  # set while this module owns an initialized process group


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``"cuda"`` -> ``cuda:<local_rank>``."""
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available (use device=cpu or device=auto)")
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
        dev = torch.device("cuda", index)
    return dev


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: str = "auto") -> DistState:
    """Join the torchrun process group if ``RANK`` / ``WORLD_SIZE`` are set, else run single-process.

    Idempotent: a second call in a process that already joined returns the same state.
    """
    global _STATE
    if _STATE is not None and dist.is_available() and dist.is_initialized():
        return _STATE
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is None or world is None:
        return DistState(device=resolve_device(device))
    local_rank = _env_int("LOCAL_RANK") or 0
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    dev = resolve_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
        atexit.register(_cleanup_at_exit)
    else:  # a process group created by someone else: adopt it
        backend = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
    _STATE = DistState(rank=rank, local_rank=local_rank, world_size=world, device=dev, backend=backend)
    return _STATE


def _active(state: DistState) -> bool:
    return state.distributed and dist.is_available() and dist.is_initialized()


def _scalar_tensor(value: float | torch.Tensor, state: DistState) -> torch.Tensor:
    # nccl only reduces CUDA tensors; gloo takes CPU tensors. float64 keeps sums of floats exact enough.
    comm_device = state.device if state.backend == "nccl" else torch.device("cpu")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a scalar (one element), got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(device=comm_device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=comm_device)


def all_reduce_sum(value: float | torch.Tensor, state: DistState) -> float:
    """Sum of a scalar over all ranks (the value itself in a single process)."""
    t = _scalar_tensor(value, state)
    if _active(state):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_reduce_mean(value: float | torch.Tensor, state: DistState) -> float:
    """Mean of a scalar over all ranks (the value itself in a single process)."""
    return all_reduce_sum(value, state) / (state.world_size if _active(state) else 1)


def all_reduce_tensor(tensor: torch.Tensor, state: DistState, op: str = "sum") -> torch.Tensor:
    """Element-wise sum (or mean) of a tensor over ranks, returned as a new float64 CPU tensor."""
    if op not in ("sum", "mean"):
        raise ValueError(f"op: expected 'sum' or 'mean', got {op!r}")
    comm_device = state.device if state.backend == "nccl" else torch.device("cpu")
    t = tensor.detach().to(device=comm_device, dtype=torch.float64).clone()
    if _active(state):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= state.world_size
    return t.cpu()


def broadcast_object(obj: Any, state: DistState, src: int = 0) -> Any:
    """Rank ``src``'s (picklable) ``obj`` on every rank; also acts as a barrier."""
    if not _active(state):
        return obj
    box = [obj if state.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(state: DistState) -> None:
    if _active(state):
        if state.backend == "nccl":
            dist.barrier(device_ids=[state.device.index])
        else:
            dist.barrier()


def cleanup(state: DistState | None = None, *, sync: bool = True) -> None:
    """Leave the process group (safe to call more than once, or without one).

    With ``sync`` every rank first waits at a barrier: a rank that tears gloo down while a peer is still
    working (writing the last checkpoint, say) can make that peer abort at exit.
    """
    global _STATE
    if dist.is_available() and dist.is_initialized():
        if sync:
            if dist.get_backend() == "nccl" and torch.cuda.is_available():
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()
        dist.destroy_process_group()
    _STATE = None


def _cleanup_at_exit() -> None:
    try:
        cleanup(sync=False)  # a rank may have crashed: never wait for peers here
    except Exception:  # interpreter shutdown: the group may already be gone
        pass


def wrap_model(model: nn.Module, state: DistState, **ddp_kwargs) -> nn.Module:
    """DistributedDataParallel over the process group (identity in a single process)."""
    if not _active(state):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if state.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [state.device.index])
        ddp_kwargs.setdefault("output_device", state.device.index)
    return DDP(model, **ddp_kwargs)


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
