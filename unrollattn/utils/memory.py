"""Peak tensor memory on any device: CUDA's allocator statistics, or on CPU a dispatch-mode tracker
that counts the bytes of tensor storages alive at once (ru_maxrss cannot separate runs in one process)."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created inside the mode that are still alive; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # a wrapper subclass (DTensor) has no storage of its own: its local tensor is counted when created
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not is_traceable_wrapper_subclass(t):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors (moments etc.)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak MiB of tensors allocated by ``fn()`` (CUDA: the allocator's peak; CPU: live-storage tracking)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak / 2**20
