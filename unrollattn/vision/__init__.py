"""Vision backbones registered with timm (importing this registers them) and image restoration."""
from ..utils.versions import warn_if_unsupported

warn_if_unsupported("timm", "torch")

from . import aot, crate, kernel_vit, photos, restoration, restoration_baselines, sampling  # noqa: F401  (registration)
from .backbone import NormalizedPatchEmbed, create_unrolled_vit

__all__ = ["NormalizedPatchEmbed", "aot", "create_unrolled_vit", "crate"]
