"""Sampling operators H of the interpolation problems y = H x (docs/papers.md A.1, A.6).

Two operators, both pixel *selections* (H ∈ {0,1}^{M×N}: no blur, no noise):

* :class:`BayerMosaic` — a colour filter array. ``x`` [B, 3, H, W] (RGB) -> ``y`` [B, 1, H, W], the
  single-plane mosaic, y[r, c] = x[channel(r, c), r, c]. Pattern "RGGB" (the default; R at even row /
  even column, B at odd / odd, G elsewhere), also "BGGR", "GRBG", "GBRG". The pattern is defined pixel
  by pixel from (row mod 2, col mod 2), so **odd sizes are accepted**: an odd image is the top-left
  crop of the next even one (tested).
* :class:`Decimation2x` — ×2 interpolation grid. ``x`` [B, C, H, W] -> ``y = x[..., ::2, ::2]``
  [B, C, H/2, W/2] (every other pixel, no anti-alias filter: this is *interpolation* as in the paper,
  not bicubic-degradation super-resolution, so numbers are not comparable with SR benchmarks).
  **Odd H or W are rejected** with a ValueError (the high-resolution size would be ambiguous: y of
  size h could come from 2h or 2h − 1); use :func:`pad_to_even` first and :func:`crop_to` after.

Every operator gives
    ``operator(x)``                   y = H x
    ``operator.adjoint(y)``           Hᵀ y: the observations placed on the full grid, zeros elsewhere, [B, C, H, W]
    ``operator.observed_mask(H, W)``  bool [1, C or 1, H, W], True where a sample is observed (= Hᵀ1)
    ``operator.interpolate(y, method)``  "bilinear" / "bicubic" interpolation that keeps the samples exactly
    ``operator.check_observation(y)`` ValueError for a wrong rank / channel count / size or NaN

Interpolation by lattice kernels: the zero-filled planes Hᵀy are reflect-padded (reflection about the
border pixel maps index −k to k, so the sampling lattice keeps its parity) and convolved with a kernel
whose taps on each lattice sum to one, then the observed samples are put back. Bilinear kernels are
the classic bilinear demosaicking ones (R/B: [½ 1 ½]⊗[½ 1 ½]; G: the 4-neighbour cross); bicubic uses
Keys' cubic convolution with a = −0.75 (PyTorch's / OpenCV's choice), separable on the square lattices
(R/B, the ×2 grid) and the mean of the horizontal and vertical cubic estimates on the G quincunx. On
the ×2 grid this equals ``F.interpolate(..., mode="bicubic"/"bilinear", align_corners=True)`` onto the
(2h − 1) × (2w − 1) grid away from the last row/column (tested).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from ..core.validation import finite_checks_enabled

__all__ = [
    "BAYER_PATTERNS", "INTERPOLATIONS", "BayerMosaic", "Decimation2x", "SamplingOperator", "build_operator",
    "crop_to", "pad_to_even",
]

BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
INTERPOLATIONS = ("bilinear", "bicubic")
_CHANNEL = {"R": 0, "G": 1, "B": 2}


def _cubic_taps(a: float = -0.75) -> tuple[float, float]:
    """Keys' cubic-convolution weights at distance ½ and 3/2 (a half-spacing interpolation)."""
    near = (a + 2) * 0.5 ** 3 - (a + 3) * 0.5 ** 2 + 1
    far = a * 1.5 ** 3 - 5 * a * 1.5 ** 2 + 8 * a * 1.5 - 4 * a
    return near, far


def _lattice_1d(method: str) -> list[float]:
    """Taps over offsets −3..3 (bicubic) or −1..1 (bilinear) for a lattice of spacing 2."""
    if method == "bilinear":
        return [0.5, 1.0, 0.5]
    near, far = _cubic_taps()
    return [far, 0.0, near, 1.0, near, 0.0, far]


def _square_kernel(method: str) -> torch.Tensor:
    k = torch.tensor(_lattice_1d(method), dtype=torch.float64)
    return torch.outer(k, k)


def _cross_kernel(method: str) -> torch.Tensor:
    """Quincunx (Bayer G) kernel: mean of the horizontal and vertical 1-D estimates, centre 1."""
    taps = _lattice_1d(method)
    size = len(taps)
    c = size // 2
    k = torch.zeros(size, size, dtype=torch.float64)
    for i, t in enumerate(taps):
        if i != c:
            k[c, i] += t / 2
            k[i, c] += t / 2
    k[c, c] = 1.0
    return k


def pad_to_even(x: torch.Tensor, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two dims of ``x`` by at most one row/column (bottom/right) to even sizes.

    Returns (padded, (H, W)) where (H, W) is the original size for :func:`crop_to`.
    ``mode`` is any ``F.pad`` mode ("reflect", "replicate", "constant").
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"pad_to_even: expected a tensor [..., H, W], got {getattr(x, 'shape', type(x).__name__)}")
    h, w = x.shape[-2:]
    ph, pw = h % 2, w % 2
    if ph == 0 and pw == 0:
        return x, (h, w)
    if mode == "reflect" and (h < 2 or w < 2):
        mode = "replicate"
    shape = x.shape
    flat = x.reshape(-1, 1, h, w) if x.ndim != 4 else x
    padded = F.pad(flat, (0, pw, 0, ph), mode=mode)
    return padded.reshape(*shape[:-2], h + ph, w + pw), (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The top-left ``size`` = (H, W) of ``x`` [..., H', W'] (undo :func:`pad_to_even`)."""
    return x[..., : size[0], : size[1]]


class SamplingOperator(ABC):
    """Base class: a pixel-selection operator y = H x with adjoint, mask and interpolation (see module doc)."""

    #: channels of the image x; None = any (``Decimation2x``)
    image_chans: int | None = None
    #: channels of the observation y; None = same as the image
    obs_chans: int | None = None
    name: str = "sampling"

    # -------------------------------------------------------------- per operator
    @abstractmethod
    def image_size(self, obs_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the image whose observation has spatial size ``obs_size``."""

    @abstractmethod
    def _mask(self, h: int, w: int, device) -> torch.Tensor:
        """bool [1, C or 1, H, W] observed-sample mask."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = H x."""

    @abstractmethod
    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Hᵀ y on the full grid."""

    @abstractmethod
    def _kernels(self, method: str, chans: int) -> torch.Tensor:
        """Depthwise interpolation kernels [C, 1, k, k] (float64)."""

    # -------------------------------------------------------------- shared
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def observed_mask(self, h: int, w: int, device=None) -> torch.Tensor:
        """bool [1, C, H, W] (Bayer, C = 3) or [1, 1, H, W] (×2 grid): True where a sample is observed."""
        return self._mask(int(h), int(w), device)

    def output_chans(self, y: torch.Tensor) -> int:
        """Channels of the image reconstructed from ``y``."""
        return self.image_chans if self.image_chans is not None else y.shape[1]

    def check_image(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: {name} expected a float image [B, {self.image_chans or 'C'}, H, W], got {got}")
        if self.image_chans is not None and x.shape[1] != self.image_chans:
            raise ValueError(f"{self.name}: {name} expected {self.image_chans} channels (RGB) [B, {self.image_chans}, H, W], "
                             f"got {list(x.shape)}")
        if finite_checks_enabled() and not torch.isfinite(x).all():
            raise ValueError(f"{self.name}: {name} expected finite values, got NaN or inf")

    def check_observation(self, y: torch.Tensor, chans: int | None = None, min_size: int = 2) -> None:
        """ValueError unless ``y`` is a finite float observation of this operator with ``chans`` channels and an
        image size of at least ``min_size`` × ``min_size``."""
        want = self.obs_chans if self.obs_chans is not None else chans
        shape = f"[B, {want or 'C'}, h, w]"
        if not isinstance(y, torch.Tensor) or y.ndim != 4 or not y.is_floating_point():
            got = f"{y.dtype} {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"{self.name}: y expected a float observation {shape}, got {got}")
        if want is not None and y.shape[1] != want:
            hint = (" (a Bayer mosaic is one plane: make it with BayerMosaic()(rgb))" if self.obs_chans == 1 else
                    " (grayscale vs colour mismatch: build the model with in_chans matching the images)")
            raise ValueError(f"{self.name}: y expected {want} channel(s) {shape}, got {list(y.shape)}{hint}")
        h, w = self.image_size(y.shape[-2:])
        if min(h, w) < min_size:
            raise ValueError(f"{self.name}: image {h}x{w} is too small; expected H, W >= {min_size}")
        if finite_checks_enabled() and not torch.isfinite(y).all():
            raise ValueError(f"{self.name}: y expected finite values, got NaN or inf")

    def interpolate(self, y: torch.Tensor, method: str = "bilinear") -> torch.Tensor:
        """Bilinear / bicubic interpolation of ``y`` by lattice kernels (module doc); observed samples kept exactly."""
        if method not in INTERPOLATIONS:
            raise ValueError(f"interpolate: method expected one of {INTERPOLATIONS}, got {method!r}")
        pad = len(_lattice_1d(method)) // 2
        self.check_observation(y, min_size=pad + 1)
        full = self.adjoint(y)
        b, c, h, w = full.shape
        mask = self.observed_mask(h, w, full.device)
        kernels = self._kernels(method, c).to(device=full.device, dtype=full.dtype)
        out = F.conv2d(F.pad(full, (pad, pad, pad, pad), mode="reflect"), kernels, groups=c)
        return torch.where(mask, full, out)

    def fill(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its observed entries replaced by the samples of ``y`` (bit-exact interpolation constraint)."""
        full = self.adjoint(y)
        return torch.where(self.observed_mask(*full.shape[-2:], device=full.device), full, x)


class BayerMosaic(SamplingOperator):
    """Bayer colour filter array, RGB [B, 3, H, W] -> mosaic [B, 1, H, W] (module doc); any H, W >= 1."""

    image_chans = 3
    obs_chans = 1

    def __init__(self, pattern: str = "RGGB"):
        pattern = str(pattern).upper()
        if pattern not in BAYER_PATTERNS:
            raise ValueError(f"BayerMosaic: pattern expected one of {BAYER_PATTERNS}, got {pattern!r}")
        self.pattern = pattern
        self.name = f"bayer_{pattern.lower()}"
        # colour index of the 2x2 tile positions (0,0), (0,1), (1,0), (1,1)
        self.tile = tuple(_CHANNEL[ch] for ch in pattern)

    def __repr__(self) -> str:
        return f"BayerMosaic(pattern={self.pattern!r})"

    def image_size(self, obs_size):
        return int(obs_size[0]), int(obs_size[1])

    def _mask(self, h, w, device):
        r = torch.arange(h, device=device).view(h, 1) % 2
        c = torch.arange(w, device=device).view(1, w) % 2
        colour = torch.tensor(self.tile, device=device)[(2 * r + c)]  # [H, W] colour index per pixel
        return (colour.unsqueeze(0) == torch.arange(3, device=device).view(3, 1, 1)).unsqueeze(0)

    def forward(self, x):
        self.check_image(x)
        mask = self.observed_mask(*x.shape[-2:], device=x.device)
        return (x * mask).sum(1, keepdim=True)

    def adjoint(self, y):
        if not isinstance(y, torch.Tensor) or y.ndim != 4 or y.shape[1] != 1:
            raise ValueError(f"{self.name}: y expected a mosaic [B, 1, H, W], got {getattr(y, 'shape', type(y).__name__)}")
        mask = self.observed_mask(*y.shape[-2:], device=y.device)
        return y * mask

    def _kernels(self, method, chans):
        square, cross = _square_kernel(method), _cross_kernel(method)
        return torch.stack([square, cross, square]).unsqueeze(1)  # [3, 1, k, k] for R, G, B


class Decimation2x(SamplingOperator):
    """×2 interpolation grid: x [B, C, H, W] (H, W even) -> x[..., ::2, ::2] (module doc)."""

    name = "decimation_x2"

    def __repr__(self) -> str:
        return "Decimation2x()"

    def image_size(self, obs_size):
        return 2 * int(obs_size[0]), 2 * int(obs_size[1])

    def _mask(self, h, w, device):
        r = torch.arange(h, device=device).view(h, 1) % 2 == 0
        c = torch.arange(w, device=device).view(1, w) % 2 == 0
        return (r & c).view(1, 1, h, w)

    def forward(self, x):
        self.check_image(x)
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            raise ValueError(f"{self.name}: expected even H and W (the x2 grid of an odd image is ambiguous), got "
                             f"{h}x{w}; pad with unrollattn.vision.sampling.pad_to_even(x) and crop_to(out, (H, W)) after")
        return x[..., ::2, ::2]

    def adjoint(self, y):
        if not isinstance(y, torch.Tensor) or y.ndim != 4:
            raise ValueError(f"{self.name}: y expected [B, C, h, w], got {getattr(y, 'shape', type(y).__name__)}")
        b, c, h, w = y.shape
        full = y.new_zeros(b, c, 2 * h, 2 * w)
        full[..., ::2, ::2] = y
        return full

    def _kernels(self, method, chans):
        return _square_kernel(method).expand(chans, 1, -1, -1).contiguous()


def build_operator(task: str, pattern: str = "RGGB") -> SamplingOperator:
    """"demosaic" -> :class:`BayerMosaic` (``pattern``), "sr2" -> :class:`Decimation2x`."""
    if task == "demosaic":
        return BayerMosaic(pattern)
    if task == "sr2":
        return Decimation2x()
    raise ValueError(f"task: expected 'demosaic' or 'sr2', got {task!r}")
