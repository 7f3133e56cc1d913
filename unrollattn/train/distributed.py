"""torchrun + DDP plumbing: one process per device, gloo on CPU, nccl on CUDA.

Launch any recipe with ``torchrun --standalone --nproc_per_node=N -m unrollattn.recipes.<name> ...``; without
the torchrun environment (``RANK`` / ``WORLD_SIZE``) everything runs as a single process and every
collective here is a no-op.
"""
from __future__ import annotations

import atexit

import torch
import torch.distributed as dist
from torch import nn

from ..utils.dist import DistState, env_int, group_active

__all__ = ["cleanup", "init_distributed", "resolve_device", "wrap_model"]


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


def init_distributed(device: str = "auto") -> DistState:
    """Join the torchrun process group if ``RANK`` / ``WORLD_SIZE`` are set, else run single-process.

    Idempotent: a second call in a process that already joined returns the same state.
    """
    global _STATE
    if _STATE is not None and dist.is_available() and dist.is_initialized():
        return _STATE
    rank, world = env_int("RANK"), env_int("WORLD_SIZE")
    if rank is None or world is None:
        return DistState(device=resolve_device(device))
    local_rank = env_int("LOCAL_RANK") or 0
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
    if not group_active(state):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if state.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [state.device.index])
        ddp_kwargs.setdefault("output_device", state.device.index)
    return DDP(model, **ddp_kwargs)
