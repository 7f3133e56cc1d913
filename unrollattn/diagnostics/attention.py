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
that weights @ V reproduces the layer's output where that identity holds. timm's own ``Attention`` (the ``vit``
baseline) is recorded the same way from its own non-fused path: while recording, its ``fused_attn`` is off and a
hook on its ``attn_drop`` reads the softmax weights that path computes (named ``mhsa (timm)``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from timm.layers.attention import Attention as TimmAttention

from ..layers.base import RecordsAttention
from ..registry import ATTENTIONS

__all__ = ["AttentionRecord", "NoAttentionLayersError", "attention_layers", "attention_maps", "attention_name",
           "recording", "token_geometry"]


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
    if isinstance(module, TimmAttention):
        return "mhsa (timm)"
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
        if isinstance(module, (RecordsAttention, TimmAttention)) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    if not found:
        raise NoAttentionLayersError(
            f"{type(model).__name__} has no unrollattn attention layer to record (expected a model built from the "
            f"registered attentions {', '.join(ATTENTIONS.names())}, timm's ViT attention or a uGLR / uGTV "
            f"restoration model; HF's own GPT-2 attention is not one)")
    return found


def token_geometry(model: nn.Module, module: nn.Module) -> tuple[tuple[int, int] | None, int]:
    """(patch grid, number of prefix tokens) that ``module`` of ``model`` sees: the layer's own (``set_geometry``),
    else the ViT's (``patch_embed.grid_size``, ``num_prefix_tokens``) for timm's attention, else (None, 0)."""
    if isinstance(module, RecordsAttention):
        return getattr(module, "grid", None), int(getattr(module, "num_prefix_tokens", 0))
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "grid_size", None) is not None:
        return tuple(int(g) for g in embed.grid_size), int(getattr(model, "num_prefix_tokens", 0))
    return None, 0


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[AttentionRecord]]:
    """Within the block every forward of ``model`` appends one :class:`AttentionRecord` per attention call to the
    yielded list; on exit the layers stop recording and the hooks are removed."""
    layers = attention_layers(model)
    records: list[AttentionRecord] = []
    calls: dict[str, int] = {}
    geometry = {name: token_geometry(model, module) for name, module in layers}
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
                grid=geometry[name][0], num_prefix_tokens=geometry[name][1], module=module))
        return after

    def timm_weights(module: nn.Module) -> Callable:
        def read(dropout, args):  # the input of attn_drop: softmax(q k^T * scale + mask), timm's own computation
            module.__dict__.setdefault("recorded", {})["weights"] = args[0].detach()
        return read

    fused = {}
    try:
        for index, (name, module) in enumerate(layers):
            if isinstance(module, TimmAttention):
                fused[name] = module.fused_attn
                module.fused_attn = False
                handles.append(module.attn_drop.register_forward_pre_hook(timm_weights(module)))
            else:
                module.record_attention = True
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after_hook(name, index)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for name, module in layers:
            if name in fused:
                module.fused_attn = fused[name]
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
