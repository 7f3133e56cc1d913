"""Subnormal floats flushed to zero on CPU while unrollattn trains, benchmarks and runs its commands.

Kernel attention's spatial terms put most log-weights hundreds of units below each row's maximum; their
exponentials land in the float32 subnormal range (below 1.2e-38), where x86 arithmetic is about a hundred times
slower: SDPA's CPU backward for bilateral attention on a 32 x 32 grid ran about 3x slower with them. Flushed to
zero they change every result by less than 1e-37 of its scale. ``torch.set_flush_denormal`` acts on the calling
thread, and the intra-op threads inherit it when they are started (at torch's first parallel operation): set it
before any parallel torch work for every thread to have it (the ``unrollattn`` command does).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_FLUSHING = False  # torch has no getter: the state this module last set (off at process start)


def set_flush_denormals(enabled: bool) -> bool:
    """Flush subnormal floats to zero on CPU (``enabled``) or keep them; returns the previous setting made here.
    A CPU without flush-to-zero support keeps subnormals (nothing changes, no error)."""
    global _FLUSHING
    previous = _FLUSHING
    if torch.set_flush_denormal(bool(enabled)):
        _FLUSHING = bool(enabled)
    return previous


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Within the block, subnormal floats are flushed to zero on CPU (``enabled``); the previous setting after it."""
    previous = set_flush_denormals(enabled)
    try:
        yield
    finally:
        set_flush_denormals(previous)


__all__ = ["flush_denormals", "set_flush_denormals"]
