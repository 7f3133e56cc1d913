"""Attention-only transformers for vision (AoT-MSSA-V, AoT-MHSA-V; docs/papers.md B.3).

Each layer is Z + attn(Z) with no MLP and, as in the paper's vision models, no LayerNorm before the
attention (``block_options={"use_norm": True}`` adds it). Sizes are not published: these use
CRATE's width/heads/depth per size so the families compare at equal width and depth.
"""
from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from ..registry import register_model as register_unrollattn
from .backbone import create_unrolled_vit, model_cfg
from .crate import CRATE_SIZES

AOT_SIZES = {size: CRATE_SIZES[size] for size in ("tiny", "small", "base")}
AOT_ATTENTIONS = {"mssa": dict(qkv_bias=False), "mhsa": dict(qkv_bias=True)}

default_cfgs = generate_default_cfgs({
    f"aot_{attn}_{size}_patch16_224.untrained": model_cfg() for attn in AOT_ATTENTIONS for size in AOT_SIZES
})


def _create_aot(family_attention: str, size: str, pretrained: bool = False, **kwargs):
    args = dict(patch_size=16, proj_bias=True, block="aot", attention=family_attention,
                block_options={"use_norm": False}, **AOT_ATTENTIONS[family_attention], **AOT_SIZES[size])
    if "block_options" in kwargs:
        kwargs["block_options"] = {**args["block_options"], **kwargs["block_options"]}
    return create_unrolled_vit(f"aot_{family_attention}_{size}_patch16_224", pretrained, **dict(args, **kwargs))


def _entry(attention: str, size: str):
    name = f"aot_{attention}_{size}_patch16_224"

    def entrypoint(pretrained: bool = False, **kwargs):
        return _create_aot(attention, size, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"AoT-{attention.upper()}-V {size}: attention-only layers with {attention}, patch 16, 224 px."
    globals()[name] = entrypoint
    register_unrollattn(name, family="aot", task="classification")(entrypoint)
    return register_model(entrypoint)


for _attn in AOT_ATTENTIONS:
    for _size in AOT_SIZES:
        _entry(_attn, _size)
