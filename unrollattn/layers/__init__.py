"""Attention layers and blocks under one constructor/forward contract; importing registers them."""
from ..registry import get_attention, get_block
from .attention import AttentionLayer, MultiHeadSelfAttention, MultiHeadSubspaceSelfAttention
from .blocks import (
    ISTA, AoTBlock, BlockBase, BoostBlock, CrateBlock, LayerZeroInput, SingleAttentionBlock, TransformerBlock,
    attach_layer_zero_input,
)
from .kernel_attention import BilateralAttention, GaussianAttention, KernelAttention, MahalanobisAttention, TwicingAttention
from . import graph_attention  # noqa: F401  (registers glr, gtv)


def build_attention(name, dim: int, num_heads: int = 8, **options):
    """Instantiate a registered attention variant: ``build_attention("mssa", 64, 4)``."""
    return get_attention(name)(dim, num_heads, **options)


def build_block(name, dim: int, num_heads: int = 8, *, attention=None, **options):
    """Instantiate a registered block with any attention: ``build_block("aot", 64, 4, attention="mhsa")``."""
    return get_block(name)(dim, num_heads, attn_layer=attention, **options)


__all__ = [
    "AoTBlock", "AttentionLayer", "BilateralAttention", "BlockBase", "BoostBlock", "LayerZeroInput",
    "attach_layer_zero_input", "GaussianAttention", "KernelAttention",
    "MahalanobisAttention", "TwicingAttention", "CrateBlock", "ISTA", "MultiHeadSelfAttention",
    "MultiHeadSubspaceSelfAttention", "SingleAttentionBlock", "TransformerBlock", "build_attention", "build_block",
]
