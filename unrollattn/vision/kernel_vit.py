"""ViTs with kernel-regression attention (docs/papers.md family C): timm's ViT layout (patch embedding, with the
input checks of ``CheckedPatchEmbed``; pre-norm attention + MLP blocks, LayerNorm eps 1e-6, qkv bias) with the
softmax attention replaced by ``gaussian``, ``mahalanobis``, ``bilateral`` (2-D patch positions) or ``twicing``.
``block="boost"`` with ``block_options={"rule": "sos" | "twicing" | "anchor", "strength": ...}`` adds a boosting
residual.

Positions. ``gaussian``, ``mahalanobis`` and ``twicing`` are range-only kernels, so they keep ViT's learned
absolute position embedding added to the tokens. ``bilateral`` takes position from its spatial kernel on the
2-D patch grid (row, col of each patch; the class token has no position and no spatial term) and has **no**
additive position embedding (``pos_embed="none"``): added to the tokens, it would bring back the
token-position cross term that bilateral attention removes (docs/papers.md C.2, C.5), and it would put
position into the values and the residual stream. This is the likely form of the kernel (our reconstruction, C.5: "Q, K
from the token stream without PE"); whether the original code also drops PE from values is not known, so
``pos_embed="learn"`` restores the additive embedding (``timm.create_model(name, pos_embed="learn")``).
"""
from __future__ import annotations

from functools import partial

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs

from ..registry import get_attention
from ..registry import register_model as register_unrollattn_model
from .backbone import CheckedPatchEmbed, create_unrolled_vit, model_cfg, register_vision_model

VIT_SIZES = {  # timm's vit_{tiny,small,base}_patch16_224
    "tiny": dict(embed_dim=192, num_heads=3, depth=12),
    "small": dict(embed_dim=384, num_heads=6, depth=12),
    "base": dict(embed_dim=768, num_heads=12, depth=12),
}
KERNEL_ATTENTIONS = ("gaussian", "mahalanobis", "bilateral", "twicing")

default_cfgs = generate_default_cfgs({
    **{f"vit_{attn}_{size}_patch16_224.untrained": model_cfg() for attn in KERNEL_ATTENTIONS for size in VIT_SIZES},
    **{f"vit_unrolled_{size}_patch16_224.untrained": model_cfg() for size in VIT_SIZES},
})


def create_vit(name: str, size: str, pretrained: bool = False, *, attention="mhsa", block="transformer", **kwargs):
    """timm's ViT layout at ``size`` with any registered ``attention`` and ``block``. An attention that encodes
    position itself (``encodes_position``, e.g. bilateral's spatial kernel) gets no additive position embedding."""
    pos_embed = "none" if getattr(get_attention(attention), "encodes_position", False) else "learn"
    args = dict(patch_size=16, qkv_bias=True, block=block, attention=attention, embed_layer=CheckedPatchEmbed,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), pos_embed=pos_embed, **VIT_SIZES[size])
    return create_unrolled_vit(name, pretrained, **dict(args, **kwargs))


for _attn in KERNEL_ATTENTIONS:
    for _size in VIT_SIZES:
        register_vision_model(
            f"vit_{_attn}_{_size}_patch16_224", __name__,
            partial(create_vit, f"vit_{_attn}_{_size}_patch16_224", _size, attention=_attn), family="kernel",
            variant=_attn, size=_size, attention=_attn, block="transformer",
            doc=f"ViT-{_size} with {_attn} kernel attention (timm's ViT otherwise), patch 16, 224 px.")

for _size in VIT_SIZES:  # any attention x block: timm.create_model(name, attention="glr", block="aot")
    register_vision_model(
        f"vit_unrolled_{_size}_patch16_224", __name__, partial(create_vit, f"vit_unrolled_{_size}_patch16_224", _size),
        family="unrolled", size=_size, composable=True,
        doc=f"ViT-{_size} layout with any registered attention= and block= (default mhsa, transformer), patch 16.")

# The softmax baseline is timm's own ViT, registered here under its timm names so recipes find it by variant.
for _size in VIT_SIZES:
    register_unrollattn_model(
        f"vit_{_size}_patch16_224", family="vit", task="classification", variant="vit", size=_size, attention="mhsa",
        block="transformer", summary=f"timm's own ViT-{_size} (softmax attention + MLP), patch 16, 224 px",
    )(partial(timm.create_model, f"vit_{_size}_patch16_224"))
