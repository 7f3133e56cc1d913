"""torchrun plumbing: one process per device, gloo on CPU, nccl on CUDA; DDP or FSDP2 over the ranks.

Launch any recipe with ``torchrun --standalone --nproc_per_node=N -m unrollattn.recipes.<name> ...``; without
the torchrun environment (``RANK`` / ``WORLD_SIZE``) everything runs as a single process and every
collective here is a no-op. ``loop.parallel=fsdp`` shards the model with :func:`shard_model` instead of
replicating it with :func:`wrap_model`.
"""
from __future__ import annotations

import atexit
import copy
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..utils.dist import DistState, env_int, group_active
from ..utils.params import layer_stack

__all__ = [
    "cleanup", "fsdp_mixed_precision", "fsdp_plan", "init_distributed", "materialize_replica", "meta_replica",
    "resolve_device", "shard_model", "wrap_model",
]


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


def fsdp_plan(model: nn.Module) -> list[str]:
    """The modules :func:`shard_model` makes FSDP2 units, in the order it shards them: each block of the model's
    layer stack (:func:`unrollattn.utils.params.layer_stack`), then the root (``""``: embeddings, head, norms and
    whatever else is not in a block). A model without a layer stack is one unit, the root."""
    try:
        stack = layer_stack(model)
    except ValueError:
        return [""]
    stack_name = next(name for name, module in model.named_modules() if module is stack)
    prefix = f"{stack_name}." if stack_name else ""
    return [f"{prefix}{index}" for index in range(len(stack))] + [""]


def fsdp_mixed_precision(precision: str, device: torch.device):
    """The FSDP2 mixed-precision policy of a run: bf16 parameters for compute with fp32 gradient reduction on CUDA
    when ``precision="bf16"``; None (everything in the parameters' dtype, fp32) otherwise, CPU / gloo included."""
    if precision == "bf16" and device.type == "cuda":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_model(model: nn.Module, state: DistState, precision: str = "fp32") -> nn.Module:
    """Shard ``model`` in place with FSDP2 (``fully_shard``) over all ranks, unit by unit as :func:`fsdp_plan`
    says; build the optimizer afterwards (it must hold the sharded parameters). Needs a torchrun process group."""
    if state.backend is None or not (dist.is_available() and dist.is_initialized()):
        raise ValueError("loop.parallel=fsdp needs a torchrun process group: launch with "
                         "`torchrun --nproc_per_node=N -m unrollattn.recipes.<name> ... loop.parallel=fsdp` "
                         "(or train in one process with loop.parallel=ddp, the default)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(state.device.type, (state.world_size,))
    policy = fsdp_mixed_precision(precision, state.device)
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy is not None else {})}
    units = dict(model.named_modules())
    for name in fsdp_plan(model):
        fully_shard(units[name], **kwargs)
    return model


def meta_replica(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory): what
    :func:`materialize_replica` turns back into a plain model once the weights are sharded."""
    memo = {id(t): (nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
                    if isinstance(t, nn.Parameter) else torch.empty_like(t, device="meta"))
            for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def materialize_replica(replica: nn.Module, full_state: Mapping[str, torch.Tensor], live_model: nn.Module) -> nn.Module:
    """``replica`` (from :func:`meta_replica`) on the CPU with the weights of ``full_state`` (a full state dict) and
    the buffers of ``live_model`` (FSDP2 leaves buffers whole on every rank, also those a state dict leaves out)."""
    materialized: dict[int, nn.Parameter] = {}  # one CPU parameter per meta parameter: tied weights stay tied
    for module in replica.modules():
        for name, param in module._parameters.items():
            if param is not None:
                if id(param) not in materialized:
                    materialized[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                           requires_grad=param.requires_grad)
                module._parameters[name] = materialized[id(param)]
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
    replica.load_state_dict(full_state, strict=True)
    live_buffers = dict(live_model.named_buffers())
    with torch.no_grad():
        for name, buffer in replica.named_buffers():
            buffer.copy_(live_buffers[name])
    return replica
