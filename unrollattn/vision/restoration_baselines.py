"""Baselines for demosaicking / ×2 interpolation, with the call signature of every restoration model: ``model(y)``.

Registered models (task "restoration"):

    bilinear_demosaic, bicubic_demosaic, bilinear_sr2, bicubic_sr2
        no parameters: lattice-kernel interpolation of the sampling operator
        (:meth:`unrollattn.vision.sampling.SamplingOperator.interpolate`: bilinear demosaicking by
        convolution of each colour plane; bicubic = Keys a = −0.75, on the ×2 grid equal to
        ``F.interpolate(mode="bicubic", align_corners=True)``).
    malvar2004_demosaic, menon2007_demosaic
        no parameters: the PyPI package ``colour-demosaicing`` (Malvar, He & Cutler 2004, "High-quality
        linear interpolation for demosaicing of Bayer-patterned color images"; Menon, Andriani & Calvagno
        2007, "Demosaicing with directional filtering and a posteriori decision"), run per image on CPU
        in float64. Install: ``pip install colour-demosaicing``.
    swin_demosaic, swin_sr2
        a conventional transformer for restoration from timm's Swin blocks
        (``timm.models.swin_transformer.SwinTransformerBlock``, window attention, shifted windows in
        every other block, ``dynamic_mask=True`` so any image size works): 3×3 conv of [bilinear x⁰,
        mask] -> ``depth`` Swin blocks -> LayerNorm -> 3×3 conv (+ the shallow features) -> 3×3 conv,
        a residual over x⁰. Defaults (embed 72, 6 heads, depth 6, window 8, MLP ratio 2) follow
        RSTCANet-B's width / heads (docs/papers.md A.6), about 0.3M parameters.

The learned models write the observed samples back exactly (``keep_observed``, default True) like
uGLR / uGTV; the classical ones return what the published algorithm returns.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_model
from .restoration import RESTORATION_TASKS, RestorationModel
from .sampling import INTERPOLATIONS

__all__ = ["CLASSICAL_METHODS", "ClassicalDemosaic", "Interpolator", "SwinRestorer", "colour_demosaicing_available"]

CLASSICAL_METHODS = {"malvar2004": "demosaicing_CFA_Bayer_Malvar2004", "menon2007": "demosaicing_CFA_Bayer_Menon2007"}


def colour_demosaicing_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("colour_demosaicing") is not None


class Interpolator(RestorationModel):
    """Bilinear / bicubic interpolation through the sampling operator (no parameters)."""

    def __init__(self, task: str = "demosaic", method: str = "bilinear", *, in_chans: int = 3, pattern: str = "RGGB"):
        super().__init__(task, in_chans=in_chans, pattern=pattern)
        if method not in INTERPOLATIONS:
            raise ValueError(f"method: expected one of {INTERPOLATIONS}, got {method!r}")
        self.method = method

    def restore(self, y):
        return self.operator.interpolate(y, self.method)

    def extra_repr(self):
        return f"{super().extra_repr()}, method={self.method!r}"


class ClassicalDemosaic(RestorationModel):
    """A ``colour-demosaicing`` algorithm (``method`` "malvar2004" or "menon2007") as a no-parameter model."""

    def __init__(self, method: str = "malvar2004", *, pattern: str = "RGGB", task: str = "demosaic", in_chans: int = 3):
        super().__init__(task, in_chans=in_chans, pattern=pattern)
        if task != "demosaic":
            raise ValueError(f"{method}: a Bayer demosaicking algorithm; expected task='demosaic', got {task!r}")
        if method not in CLASSICAL_METHODS:
            raise ValueError(f"method: expected one of {tuple(CLASSICAL_METHODS)}, got {method!r}")
        if not colour_demosaicing_available():
            raise ValueError(f"{method} needs the PyPI package colour-demosaicing: pip install colour-demosaicing")
        self.method = method

    def restore(self, y):
        import colour_demosaicing

        fn = getattr(colour_demosaicing, CLASSICAL_METHODS[self.method])
        cfa = y[:, 0].detach().to("cpu", torch.float64).numpy()
        out = np.stack([np.asarray(fn(plane, self.pattern), dtype=np.float64) for plane in cfa])  # [B, H, W, 3]
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(device=y.device, dtype=y.dtype)

    def extra_repr(self):
        return f"{super().extra_repr()}, method={self.method!r}"


SWIN_OPTIONS = ("embed_dim", "depth", "num_heads", "window_size", "mlp_ratio")  # the recipe's model.<option> keys


class SwinRestorer(RestorationModel):
    """Swin-block restoration transformer over the bilinear initialisation (module doc)."""

    def __init__(self, task: str = "demosaic", *, embed_dim: int = 72, depth: int = 6, num_heads: int = 6,
                 window_size: int = 8, mlp_ratio: float = 2.0, keep_observed: bool = True, in_chans: int = 3,
                 pattern: str = "RGGB"):
        super().__init__(task, in_chans=in_chans, pattern=pattern)
        from timm.models.swin_transformer import SwinTransformerBlock

        if min(embed_dim, depth, num_heads, window_size) < 1 or embed_dim % num_heads:
            raise ValueError(f"expected positive sizes with embed_dim divisible by num_heads, got embed_dim={embed_dim}, "
                             f"depth={depth}, num_heads={num_heads}, window_size={window_size}")
        c = self.chans
        self.window_size, self.keep_observed = window_size, keep_observed
        self.embed = nn.Conv2d(2 * c, embed_dim, 3, padding=1)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(embed_dim, input_resolution=(window_size, window_size), num_heads=num_heads,
                                 window_size=window_size, shift_size=0 if i % 2 == 0 else window_size // 2,
                                 always_partition=True, dynamic_mask=True, mlp_ratio=mlp_ratio)
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.head = nn.Conv2d(embed_dim, c, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # start exactly at the bilinear initialisation (residual learning)
        nn.init.zeros_(self.head.bias)

    def restore(self, y):
        x0 = self.operator.interpolate(y, "bilinear")
        b, c, h, w = x0.shape
        mask = self.operator.observed_mask(h, w, device=y.device)
        feat = self.embed(torch.cat([x0, mask.to(x0.dtype).expand_as(x0)], 1))
        ws = self.window_size
        ph, pw = (-h) % ws, (-w) % ws  # pad to whole windows (reflect where possible), crop after
        mode = "reflect" if ph < h and pw < w else "replicate"
        t = F.pad(feat, (0, pw, 0, ph), mode=mode) if ph or pw else feat
        t = t.permute(0, 2, 3, 1)
        for block in self.blocks:
            t = block(t)
        t = self.norm(t).permute(0, 3, 1, 2)[..., :h, :w]
        out = x0 + self.head(self.conv_after(t) + feat)
        return self.operator.fill(y, out) if self.keep_observed else out


def _register():
    for task in RESTORATION_TASKS:
        what = "Bayer RGGB demosaicking" if task == "demosaic" else "x2 interpolation"
        for method in INTERPOLATIONS:
            def build(_task=task, _method=method, **options):
                return Interpolator(_task, _method, **options)

            register_model(f"{method}_{task}", family="interpolation", task="restoration", variant=method, size=task,
                           learned=False, summary=f"{method} {what} (no parameters)")(build)

        def build_swin(_task=task, **options):
            return SwinRestorer(_task, **options)

        register_model(f"swin_{task}", family="swin", task="restoration", variant="transformer", size=task,
                       learned=True, config_options={key: key for key in SWIN_OPTIONS},
                       summary=f"timm Swin-block transformer for {what}, residual over bilinear")(build_swin)
    for method in CLASSICAL_METHODS:
        def build_classical(_method=method, **options):
            return ClassicalDemosaic(_method, **options)

        register_model(f"{method}_demosaic", family="classical", task="restoration", variant=method.rstrip("0123456789"),
                       size="demosaic", learned=False, summary=f"colour-demosaicing {method} (no parameters; pip install colour-demosaicing)")(build_classical)


_register()
