"""One builder for every unrolled ViT-style backbone: timm's stock ``VisionTransformer`` with an
unrollattn ``block_fn`` / ``attn_layer`` (so features_only, forward_intermediates, pos-embed resampling
and reset_classifier come from timm), and CRATE's normalised patch embedding.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
import sys

from timm.models import build_model_with_cfg, register_model as timm_register_model
from timm.models.vision_transformer import VisionTransformer

from ..core.validation import check_float, check_images, check_int, check_size_pair
from ..layers.blocks import attach_layer_zero_input
from ..registry import get_attention, get_block
from ..registry import register_model as register_unrollattn_model


class CheckedPatchEmbed(PatchEmbed):
    """timm's patch embedding with clear errors for what it would otherwise fail on deep inside: images that are
    not a float batch [B, in_chans, H, W] of the model's dtype (uint8 pixels, a single [C, H, W] image), of
    another size than ``img_size`` (with ``strict_img_size``), or not divisible by the patch size."""

    def check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.proj.in_channels, dtype=self.proj.weight.dtype)
        h, w = x.shape[-2:]
        ph, pw = self.patch_size
        if self.img_size is not None and self.strict_img_size and (h, w) != tuple(self.img_size):
            raise ValueError(f"expected {self.img_size[0]}x{self.img_size[1]} images, got {h}x{w} "
                             "(pass img_size= or dynamic_img_size=True)")
        if not self.dynamic_img_pad and (h % ph or w % pw):
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {ph}x{pw}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return super().forward(x)


class NormalizedPatchEmbed(CheckedPatchEmbed):
    """CRATE's patch embedding: LayerNorm over each flattened patch, linear map, LayerNorm (``norm_layer``).

    ``patch_norm_eps``: that first LayerNorm's epsilon. A patch of (near) zero variance — flat background — is divided
    by sqrt(var + eps), so a small eps turns a 1/255 perturbation of it into a full-size token; a larger eps bounds
    that gain (see the README's robustness notes)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, *, patch_norm_eps: float = 1e-5,
                 device=None, dtype=None, **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         device=device, dtype=dtype, **kwargs)
        if not isinstance(patch_norm_eps, (int, float)) or not 0 < patch_norm_eps < float("inf"):
            raise ValueError(f"patch_norm_eps: expected a positive float, got {patch_norm_eps!r}")
        self.patch_norm = nn.LayerNorm(in_chans * self.patch_size[0] * self.patch_size[1], eps=float(patch_norm_eps),
                                       device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        b, _, h, w = x.shape
        ph, pw = self.patch_size
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))
        gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
        c = x.shape[1]
        patches = (x.view(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)  # [B, L, C*ph*pw], the conv weight's order
                   .reshape(b, gh * gw, c * ph * pw))
        tokens = F.linear(self.patch_norm(patches), self.proj.weight.flatten(1), self.proj.bias)
        if not self.flatten:
            tokens = tokens.view(b, gh, gw, -1)
            if self.output_fmt.value == "NCHW":
                tokens = tokens.permute(0, 3, 1, 2)
        return self.norm(tokens)


def model_cfg(**kwargs) -> dict:
    """timm pretrained-cfg for an untrained unrollattn architecture (no remote weights implied)."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "mit", **kwargs,
    }


def create_unrolled_vit(variant: str, pretrained: bool = False, *, block="aot", attention="mssa",
                        block_options: dict | None = None, attn_options: dict | None = None,
                        patch_norm_eps: float | None = None, **kwargs) -> VisionTransformer:
    """Build ``variant`` as a timm VisionTransformer whose blocks are ``block`` with ``attention``.

    ``attention`` / ``block`` are registry names (or classes); ``attn_options`` / ``block_options`` bind
    their options; ``patch_norm_eps`` sets the epsilon of the patch embedding's per-patch LayerNorm
    (:class:`NormalizedPatchEmbed`). All other keywords go to ``VisionTransformer`` (img_size, patch_size,
    in_chans, num_classes, embed_dim, depth, num_heads, global_pool, drop_path_rate, ...).
    """
    if "block_fn" in kwargs or "attn_layer" in kwargs:
        raise ValueError("pass block= and attention= (registry names or classes), not block_fn=/attn_layer=")
    check_vit_sizes(kwargs)
    block_cls = get_block(block).with_options(**(block_options or {}))
    attn_cls = get_attention(attention).with_options(**(attn_options or {}))
    out_indices = kwargs.pop("out_indices", 3)
    kwargs.setdefault("embed_layer", NormalizedPatchEmbed)
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-5))
    if kwargs["embed_layer"] is NormalizedPatchEmbed:
        kwargs.setdefault("embed_norm_layer", kwargs["norm_layer"])
        if patch_norm_eps is not None:
            kwargs["embed_layer"] = partial(NormalizedPatchEmbed, patch_norm_eps=patch_norm_eps)
    elif patch_norm_eps is not None:
        raise ValueError("patch_norm_eps: only the normalised patch embedding (NormalizedPatchEmbed) has a per-patch "
                         f"LayerNorm; this model's embed_layer is {kwargs['embed_layer']!r}")
    model = build_model_with_cfg(
        VisionTransformer, variant, pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        block_fn=block_cls, attn_layer=attn_cls, **kwargs,
    )
    vit = getattr(model, "model", model)  # features_only wraps the ViT
    set_token_geometry(model, tuple(vit.patch_embed.grid_size), vit.num_prefix_tokens)
    attach_layer_zero_input(vit.blocks)
    return model


VIT_INT_OPTIONS = {"embed_dim": 1, "depth": 1, "num_heads": 1, "in_chans": 1, "num_classes": 0, "reg_tokens": 0}


def check_vit_sizes(options: dict) -> None:
    """ValueError naming the option for a size timm would fail on obscurely (patch_size=0: a division by zero;
    a negative embed_dim: a negative tensor dimension)."""
    for name, minimum in VIT_INT_OPTIONS.items():
        if name in options:
            check_int(name, options[name], minimum)
    for name in ("img_size", "patch_size"):
        if options.get(name) is not None:
            check_size_pair(name, options[name])
    if "mlp_ratio" in options:
        check_float("mlp_ratio", options["mlp_ratio"], 0.0, open_min=True)


def set_token_geometry(model: nn.Module, grid: tuple[int, int], num_prefix_tokens: int) -> nn.Module:
    """Tell every geometry-aware layer of ``model`` the patch grid and the number of prefix tokens."""
    for module in model.modules():
        if hasattr(module, "set_geometry"):
            module.set_geometry(grid=grid, num_prefix_tokens=num_prefix_tokens)
    return model


def register_vision_model(name: str, module: str, create, *, family: str, doc: str, **meta):
    """Register ``create(pretrained, **kwargs)`` under ``name`` with timm and with the unrollattn registry.

    The entrypoint lives in ``module`` (whose ``default_cfgs`` timm reads at registration). ``meta`` goes to the
    unrollattn registry: ``variant`` (the short name recipes use), ``size``, ``attention``, ``block``.
    """
    def entrypoint(pretrained: bool = False, **kwargs):
        return create(pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module
    entrypoint.__doc__ = doc
    setattr(sys.modules[module], name, entrypoint)
    register_unrollattn_model(name, family=family, task="classification", summary=doc, **meta)(entrypoint)
    return timm_register_model(entrypoint)
