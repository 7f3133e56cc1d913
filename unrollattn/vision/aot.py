"""Attention-only transformers for vision (AoT-MSSA-V, AoT-MHSA-V; docs/papers.md B.3).

Each layer is Z + attn(Z) with no MLP and, as in the paper's vision models, no LayerNorm before the
attention (``block_options={"use_norm": True}`` adds it). Sizes are not published: these use
CRATE's width/heads/depth per size so the families compare at equal width and depth.
"""
from __future__ import annotations

from functools import partial

from timm.models import generate_default_cfgs

from .backbone import create_unrolled_vit, model_cfg, register_vision_model
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


for _attn in AOT_ATTENTIONS:
    for _size in AOT_SIZES:
        register_vision_model(
            f"aot_{_attn}_{_size}_patch16_224", __name__, partial(_create_aot, _attn, _size), family="aot",
            variant=f"aot_{_attn}", size=_size, attention=_attn, block="aot", doc=f"AoT-{_attn.upper()}-V {_size}: attention-only layers with {_attn}, patch 16, 224 px.")
