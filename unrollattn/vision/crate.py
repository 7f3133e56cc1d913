"""CRATE backbones (docs/papers.md B.5-B.6): MSSA + ISTA blocks, registered with timm and unrollattn."""
from __future__ import annotations

from functools import partial

from timm.models import generate_default_cfgs

from .backbone import create_unrolled_vit, model_cfg, register_vision_model

# dim, heads, depth as published; head dim = dim / heads (CRATE-S: 576 / 12 = 48).
CRATE_SIZES = {
    "tiny": dict(embed_dim=384, num_heads=6, depth=12),
    "small": dict(embed_dim=576, num_heads=12, depth=12),
    "base": dict(embed_dim=768, num_heads=12, depth=12),
    "large": dict(embed_dim=1024, num_heads=16, depth=24),
}
PUBLISHED_PARAMS = {"tiny": 6.09e6, "small": 13.12e6, "base": 22.80e6, "large": 77.64e6}

default_cfgs = generate_default_cfgs({
    f"crate_{size}_patch16_224.untrained": model_cfg() for size in CRATE_SIZES
})


def _create_crate(size: str, pretrained: bool = False, **kwargs):
    args = dict(patch_size=16, qkv_bias=False, proj_bias=True, **CRATE_SIZES[size])
    args.update(block="crate", attention="mssa")
    return create_unrolled_vit(f"crate_{size}_patch16_224", pretrained, **dict(args, **kwargs))


for _size in CRATE_SIZES:
    register_vision_model(
        f"crate_{_size}_patch16_224", __name__, partial(_create_crate, _size), family="crate",
        variant="crate", size=_size, attention="mssa", block="crate", doc=f"CRATE-{_size[0].upper()}/16 at 224 px ({PUBLISHED_PARAMS[_size] / 1e6:.2f}M published parameters).")
