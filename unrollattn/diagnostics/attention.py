"""Attention weights of a model's own forward, captured through forward hooks on its layers.

Every attention layer of the library (``AttentionLayer``) and every learned-graph filter (``GraphFilter``: the
``glr`` / ``gtv`` layers and the uGLR / uGTV restoration blocks) can record what its forward computed
(``layers.base.RecordsAttention``). :func:`recording` switches that on for a model and collects the records from
forward hooks; :func:`attention_maps` runs one forward and returns them::

    records = attention_maps(model, images)
    records[0].tensors["weights"]        # [B, H, N, N]: mhsa, mssa, gaussian, mahalanobis, bilateral, twicing
    records[0].tensors["range"]          # bilateral: range factor, each normalised over the keys (C.5)
    records[0].tensors["spatial"]        #            spatial factor
    records[0].tensors["edge_weights"]   # glr / gtv / uglr / ugtv: [B, G, N, k] on ``neighbour_index`` [N, k] (A.4)
    records[0].output                    # what the layer returned (restoration blocks: the image after the block)

There is no second forward implementation: the weights are those of the layer's forward, and the tests check
that weights @ V reproduces the layer's output where that identity holds.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..layers.base import RecordsAttention
from ..registry import ATTENTIONS

__all__ = ["AttentionRecord", "NoAttentionLayersError", "attention_layers", "attention_maps", "attention_name",
           "recording"]


class NoAttentionLayersError(ValueError):
    """A model without any layer that records attention (``layers.base.RecordsAttention``)."""


@dataclasses.dataclass
class AttentionRecord:
    """What one call of one attention layer computed: ``tensors`` (``weights``, ``range``, ``spatial``,
    ``edge_weights``, ``neighbour_index``, ``neighbour_valid``, ``prefix_weights``), the layer's ``output``, its
    module path ``name``, its position ``layer`` among the model's attention layers, ``call`` (0, 1, ... when a block
    calls its attention more than once), the registered ``attention`` name and the token geometry."""

    name: str
    layer: int
    call: int
    attention: str
    tensors: dict[str, torch.Tensor]
    output: torch.Tensor | None
    grid: tuple[int, int] | None
    num_prefix_tokens: int
    module: nn.Module = dataclasses.field(repr=False)


def attention_name(module: nn.Module) -> str:
    """The registered attention name of ``module`` (the most specific registered class it is an instance of), or
    ``u<prior>`` for a restoration graph block; the class name otherwise."""
    registered = {ATTENTIONS.get(name): name for name in ATTENTIONS.names()}
    for cls in type(module).__mro__:
        if cls in registered:
            return registered[cls]
    prior = getattr(module, "prior", None)
    if prior in ("glr", "gtv"):
        return f"u{prior}"
    return type(module).__name__


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module path, module) of every layer of ``model`` that records attention, in module order; a recording
    layer inside another (none today) is listed once, as the outer one."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, RecordsAttention) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    if not found:
        raise NoAttentionLayersError(
            f"{type(model).__name__} has no unrollattn attention layer to record (expected a model built from the "
            f"registered attentions {', '.join(ATTENTIONS.names())} or a uGLR / uGTV restoration model; HF's own "
            f"GPT-2 attention is not one)")
    return found


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[AttentionRecord]]:
    """Within the block every forward of ``model`` appends one :class:`AttentionRecord` per attention call to the
    yielded list; on exit the layers stop recording and the hooks are removed."""
    layers = attention_layers(model)
    records: list[AttentionRecord] = []
    calls: dict[str, int] = {}
    handles = []

    def before(module, args):
        module.__dict__["recorded"] = {}

    def after_hook(name: str, index: int) -> Callable:
        def after(module, args, output):
            call = calls.get(name, 0)
            calls[name] = call + 1
            records.append(AttentionRecord(
                name=name, layer=index, call=call, attention=attention_name(module),
                tensors=dict(module.__dict__.pop("recorded", {})),
                output=output.detach() if isinstance(output, torch.Tensor) else None,
                grid=getattr(module, "grid", None), num_prefix_tokens=int(getattr(module, "num_prefix_tokens", 0)),
                module=module))
        return after

    try:
        for index, (name, module) in enumerate(layers):
            module.record_attention = True
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after_hook(name, index)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for _, module in layers:
            module.__dict__.pop("record_attention", None)  # back to the class default (off)
            module.__dict__.pop("recorded", None)


@torch.no_grad()
def attention_maps(model: nn.Module, inputs: Any, **forward_kwargs) -> list[AttentionRecord]:
    """One forward ``model(inputs, **forward_kwargs)`` (no gradients), returning the attention of every layer call
    (:class:`AttentionRecord`, in call order). A model without attention layers raises
    :class:`NoAttentionLayersError`."""
    with recording(model) as records:
        model(inputs, **forward_kwargs)
    return list(records)
