"""Vision backbones registered with timm (importing this registers them) and image restoration."""
from . import aot, crate, kernel_vit, photos, restoration, restoration_baselines, sampling  # noqa: F401  (registration)
from .backbone import NormalizedPatchEmbed, create_unrolled_vit

__all__ = ["NormalizedPatchEmbed", "aot", "create_unrolled_vit", "crate"]
