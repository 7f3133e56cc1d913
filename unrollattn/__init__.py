"""unrollattn: white-box attention from unrolled denoisers, for timm and HF transformers.

Importing the package registers every attention variant, block and model (also as timm names).
"""
from . import language, layers, vision  # noqa: F401  (registration side effects)
from .core.validation import set_finite_checks
from .registry import (
    ATTENTIONS, BLOCKS, MODELS, UnknownNameError, build_model, get_attention, get_block, list_attentions,
    list_blocks, list_models, register_attention, register_block, register_model,
)
from .layers import build_attention, build_block

__version__ = "0.1.0"

__all__ = [
    "ATTENTIONS", "BLOCKS", "MODELS", "UnknownNameError", "__version__", "build_attention", "build_block",
    "build_model", "get_attention", "get_block", "list_attentions", "list_blocks", "list_models",
    "register_attention", "register_block", "register_model", "set_finite_checks",
]
