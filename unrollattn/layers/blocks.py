"""Blocks: ``transformer`` (pre-norm attention + MLP), ``aot`` (attention + skip only) and ``crate``
(MSSA + ISTA). Each takes any registered attention by name or class and honours timm's ``block_fn``
contract, so ``VisionTransformer(block_fn=Cls)`` builds with it.
"""
from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp

from ..core.subspace import ista_step
from ..registry import get_attention, register_block
from .base import Configurable
from .decoding import cached_prefix, decode_by_recompute


class ISTA(nn.Module):
    """One unrolled ISTA step with a learned d x d dictionary D (docs/papers.md B.5)."""

    def __init__(self, dim: int, step_size: float = 0.1, lambd: float = 0.1, device=None, dtype=None):
        super().__init__()
        if step_size <= 0 or lambd < 0:
            raise ValueError(f"ISTA expects step_size > 0 and lambd >= 0, got step_size={step_size}, lambd={lambd}")
        self.step_size, self.lambd = float(step_size), float(lambd)
        self.weight = nn.Parameter(torch.empty(dim, dim, device=device, dtype=dtype))  # D
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear, which CRATE's reference uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ista_step(x, self.weight, self.step_size, self.lambd)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, step_size={self.step_size}, lambd={self.lambd}"


class BlockBase(Configurable):
    """Shared constructor for blocks; accepts exactly what timm's ``block_fn`` is called with.

    ``decode`` (cached causal decoding, ``unrollattn.layers.decoding``) reruns the block over its cached inputs;
    :class:`SingleAttentionBlock` extends it from the attention's own ``decode`` instead.
    """

    default_attention = "mhsa"
    option_names: tuple[str, ...] = ("attn_options",)

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, *, qkv_bias: bool = False,
                 proj_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 init_values: float | None = None, norm_layer=None, act_layer=None, mlp_layer=None,
                 attn_layer=None, device=None, dtype=None, **options):
        super().__init__()
        options = {**self.bound_options, **options}
        own = {k: options.pop(k) for k in list(options) if k in self.option_names}
        self._drop_passthrough(type(self).__name__, options, set(self.option_names))
        self.options = own
        self.dim = dim
        dd = {"device": device, "dtype": dtype}
        self.dd = dd
        self.norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        attn_cls = get_attention(attn_layer or self.default_attention)
        self.attn = attn_cls(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop,
                             proj_drop=proj_drop, **dd, **own.get("attn_options", {}))
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp_ratio, self.proj_drop, self.drop_path, self.init_values = mlp_ratio, proj_drop, drop_path, init_values
        self.act_layer, self.mlp_layer = act_layer or nn.GELU, mlp_layer or Mlp

    @staticmethod
    def residual_branch(h: torch.Tensor, layer_scale: nn.Module, drop_path: nn.Module) -> torch.Tensor:
        """``drop_path(layer_scale(h))``, not calling the ones that are ``nn.Identity`` (a decoding step would pay a
        module call for each, per layer and token)."""
        if not isinstance(layer_scale, nn.Identity):
            h = layer_scale(h)
        return h if isinstance(drop_path, nn.Identity) else drop_path(h)

    decode_recomputes_block = True  # decode reruns the block over its cached inputs (it may call attn more than once)

    @property
    def decode_recomputes_prefix(self) -> bool:
        return self.decode_recomputes_block or self.attn.decode_recomputes_prefix

    def decode(self, x: torch.Tensor, cache, layer_idx: int, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal output of the new tokens ``x`` [B, Tq, C], extending ``cache`` at ``layer_idx``: by default the block
        is rerun over its cached inputs (exact, as the block is causal)."""
        return decode_by_recompute(self, x, cache, layer_idx, attn_mask)


class SingleAttentionBlock(BlockBase, metaclass=ABCMeta):
    """A block that calls its attention once, with per-token maps around it: it defines ``update(x, attend)`` (its
    forward given a token-mixing callable), which runs with the attention over all tokens in ``forward`` and with
    ``attn.decode`` on the new tokens in ``decode``. A subclass that overrides ``forward`` but not ``update`` decodes
    by recomputation instead."""

    decode_recomputes_block = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ and "update" not in cls.__dict__:  # own forward: update() no longer describes it
            cls.decode_recomputes_block = True

    @abstractmethod
    def update(self, x: torch.Tensor, attend) -> torch.Tensor:
        """The block's output for ``x``, with ``attend(h)`` as its token mixing."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return self.update(x, lambda h: self.attn(h, attn_mask=attn_mask, is_causal=is_causal))

    def decode(self, x, cache, layer_idx, attn_mask=None):
        if self.decode_recomputes_block:
            return super().decode(x, cache, layer_idx, attn_mask)
        return self.update(x, lambda h: self.attn.decode(h, cache, layer_idx, attn_mask))


@register_block("transformer", summary="x + attn(LN(x)); x + MLP(LN(x))")
class TransformerBlock(SingleAttentionBlock):
    """The baseline pre-norm block, with any attention variant."""

    def __init__(self, dim, num_heads=8, mlp_ratio=4.0, **kwargs):
        super().__init__(dim, num_heads, mlp_ratio, **kwargs)
        self.norm1 = self.norm_layer(dim, **self.dd)
        self.norm2 = self.norm_layer(dim, **self.dd)
        self.mlp = self.mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=self.act_layer,
                                  drop=self.proj_drop, **self.dd)
        self.ls2 = LayerScale(dim, init_values=self.init_values, **self.dd) if self.init_values else nn.Identity()
        self.drop_path2 = DropPath(self.drop_path) if self.drop_path > 0.0 else nn.Identity()

    def update(self, x, attend):
        x = x + self.residual_branch(attend(self.norm1(x)), self.ls1, self.drop_path1)
        return x + self.residual_branch(self.mlp(self.norm2(x)), self.ls2, self.drop_path2)


@register_block("aot", summary="x + attn(LN(x)), no MLP (LN optional: use_norm)")
class AoTBlock(SingleAttentionBlock):
    """Attention-only layer Z + MSSA(LN(Z)) (docs/papers.md B.3); ``use_norm=False`` drops the LN (vision)."""

    default_attention = "mssa"
    option_names = ("attn_options", "use_norm")

    def __init__(self, dim, num_heads=8, mlp_ratio=4.0, **kwargs):
        super().__init__(dim, num_heads, mlp_ratio, **kwargs)
        self.norm1 = self.norm_layer(dim, **self.dd) if self.options.get("use_norm", True) else nn.Identity()

    def update(self, x, attend):
        return x + self.residual_branch(attend(self.norm1(x)), self.ls1, self.drop_path1)


class SparseCodingStep(nn.Module):
    """CRATE-alpha's sparse-coding layer (papers.md B.9): ``steps`` ISTA steps from A_0 = 0 with an (over)complete
    dictionary D in R^{d x m} (m = ``expansion`` * d),

        A_{k+1} = ReLU(A_k - eta D^T (D A_k - z) - eta lambda),

    returning the decoded D_hat A with a separate (untied) decoder D_hat in R^{d x m}; the block adds it to the
    residual stream. One step from A_0 = 0 is ReLU(eta D^T z - eta lambda): an MLP with ReLU and a fixed threshold.
    """

    def __init__(self, dim: int, expansion: int = 1, steps: int = 1, step_size: float = 0.1, lambd: float = 0.1,
                 device=None, dtype=None):
        super().__init__()
        if int(expansion) != expansion or expansion < 1 or int(steps) != steps or steps < 1:
            raise ValueError(f"sparse coding expects integer expansion >= 1 and steps >= 1, got {expansion}, {steps}")
        if step_size <= 0 or lambd < 0:
            raise ValueError(f"sparse coding expects step_size > 0 and lambd >= 0, got {step_size}, {lambd}")
        self.steps, self.step_size, self.lambd = int(steps), float(step_size), float(lambd)
        self.encoder = nn.Linear(dim, int(expansion) * dim, bias=False, device=device, dtype=dtype)  # x -> D^T x
        self.decoder = nn.Linear(int(expansion) * dim, dim, bias=False, device=device, dtype=dtype)  # A -> D_hat A

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """The sparse codes A [.., m] after ``steps`` ISTA steps from zero."""
        eta, thr = self.step_size, self.step_size * self.lambd
        dtz = self.encoder(z)  # D^T z
        a = F.relu(eta * dtz - thr)
        for _ in range(self.steps - 1):  # A - eta D^T (D A - z) - eta lambda
            a = F.relu(a - eta * (self.encoder(F.linear(a, self.encoder.weight.t())) - dtz) - thr)
        return a

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.codes(z))


@register_block("crate", summary="x + MSSA(LN(x)), then ISTA(LN(.)) with no residual (or CRATE-alpha's residual "
                                 "sparse coding)")
class CrateBlock(SingleAttentionBlock):
    """CRATE layer (B.5): Z^{l+1/2} = Z + MSSA(LN(Z)), then

    - ``ista="crate"`` (default, the CRATE paper and code): Z^{l+1} = ISTA(LN(Z^{l+1/2})), one nonnegative proximal
      step with a d x d dictionary and **no residual**; ``ista_residual=True`` adds Z^{l+1/2} back (a diagnostic);
    - ``ista="alpha"`` (CRATE-alpha, B.9): Z^{l+1} = Z^{l+1/2} + D_hat A, A = ``ista_steps`` ISTA steps from zero on
      LN(Z^{l+1/2}) with an ``ista_expansion`` x overcomplete dictionary and an untied decoder (:class:`SparseCodingStep`).

    Deep causal language models need the residual form: with ``ista="crate"`` every layer ends in ReLU(LN(.)), the
    active fraction of the stream halves from layer to layer (6% of the coordinates are non-zero after 16 layers at
    initialisation) and the 16-layer quick-preset LM never leaves the unigram loss (see unrollattn/recipes/lm.py).
    """

    default_attention = "mssa"
    option_names = ("attn_options", "ista", "ista_step_size", "ista_lambda", "ista_residual", "ista_expansion",
                    "ista_steps")
    ISTA_KINDS = ("crate", "alpha")

    def __init__(self, dim, num_heads=8, mlp_ratio=4.0, **kwargs):
        super().__init__(dim, num_heads, mlp_ratio, **kwargs)
        o = self.options
        self.kind = o.get("ista", "crate")
        if self.kind not in self.ISTA_KINDS:
            raise ValueError(f"ista: expected one of {self.ISTA_KINDS}, got {self.kind!r}")
        self.norm1 = self.norm_layer(dim, **self.dd)
        self.norm2 = self.norm_layer(dim, **self.dd)
        step, lambd = o.get("ista_step_size", 0.1), o.get("ista_lambda", 0.1)
        if self.kind == "crate":
            if "ista_expansion" in o or "ista_steps" in o:
                raise ValueError("ista_expansion / ista_steps need ista='alpha' (CRATE's own ISTA is one d x d step)")
            self.ista = ISTA(dim, step, lambd, **self.dd)
            self.ista_residual = bool(o.get("ista_residual", False))
        else:
            if "ista_residual" in o:
                raise ValueError("ista='alpha' always has the residual; ista_residual is for ista='crate'")
            self.ista = SparseCodingStep(dim, o.get("ista_expansion", 1), o.get("ista_steps", 1), step, lambd, **self.dd)
            self.ista_residual = True

    def update(self, x, attend):
        x = x + self.residual_branch(attend(self.norm1(x)), self.ls1, self.drop_path1)
        if self.ista_residual:
            return x + self.ista(self.norm2(x))
        return self.ista(self.norm2(x))


class LayerZeroInput:
    """Holds the input of the first block so ``boost`` blocks with rule='anchor' (B3) can pull toward it."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def set(self, x: torch.Tensor | None) -> None:
        self.value = x


def attach_layer_zero_input(blocks: nn.Module) -> LayerZeroInput | None:
    """Share one ``LayerZeroInput`` among the anchor-rule blocks in ``blocks``; a forward pre-hook on ``blocks``
    (an ``nn.Sequential``, as in timm's ViT) records its input. Models that loop over a ModuleList call
    ``anchor.set(x)`` themselves. Returns None when no block needs it."""
    users = [m for m in blocks.modules() if isinstance(m, BoostBlock) and m.rule == "anchor"]
    if not users:
        return None
    anchor = LayerZeroInput()
    for block in users:
        block.layer_zero = anchor
    blocks.register_forward_pre_hook(lambda module, args: anchor.set(args[0]))
    blocks.register_forward_hook(lambda module, args, output: anchor.set(None))  # don't keep activations alive
    return anchor


@register_block("boost", summary="attention with a boosting residual (B1 sos / B2 twicing / B3 anchor) + MLP")
class BoostBlock(BlockBase):
    """Residual read as a boosting step (docs/papers.md C.6). The rules are the paper's *candidates* [R]:

    - ``sos`` (B1):     x + SA(LN(x + rho u)),  u = SA(LN(x))   [= F(x + rho u) - rho u with F(s) = s + SA(LN(s))]
    - ``twicing`` (B2): x + SA(LN x) + lambda SA(LN x - SA(LN x))
    - ``anchor`` (B3):  x + SA(LN x) + lambda (x_0 - x), x_0 the input of the first block (NeuTRENO-like)
    - ``none``:         x + SA(LN x), the plain residual

    ``strength`` is rho or lambda; ``mlp`` (default True) adds the usual MLP sub-layer.
    """

    option_names = ("attn_options", "rule", "strength", "mlp")
    RULES = {"none": 0.0, "sos": 0.5, "twicing": 1.0, "anchor": 0.6}  # default strengths

    def __init__(self, dim, num_heads=8, mlp_ratio=4.0, **kwargs):
        super().__init__(dim, num_heads, mlp_ratio, **kwargs)
        self.rule = self.options.get("rule", "twicing")
        if self.rule not in self.RULES:
            raise ValueError(f"rule: expected one of {tuple(self.RULES)}, got {self.rule!r}")
        self.strength = float(self.options.get("strength", self.RULES[self.rule]))
        self.norm1 = self.norm_layer(dim, **self.dd)
        self.layer_zero: LayerZeroInput | None = None
        if self.options.get("mlp", True):
            self.norm2 = self.norm_layer(dim, **self.dd)
            self.mlp = self.mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=self.act_layer,
                                      drop=self.proj_drop, **self.dd)
            self.ls2 = LayerScale(dim, init_values=self.init_values, **self.dd) if self.init_values else nn.Identity()
            self.drop_path2 = DropPath(self.drop_path) if self.drop_path > 0.0 else nn.Identity()
        else:
            self.mlp = None

    def boosted_attention(self, x, attn_mask, is_causal):
        attend = lambda t: self.attn(t, attn_mask=attn_mask, is_causal=is_causal)  # noqa: E731
        u = attend(self.norm1(x))
        if self.rule == "sos":
            return attend(self.norm1(x + self.strength * u))
        if self.rule == "twicing":
            return u + self.strength * attend(self.norm1(x) - u)
        if self.rule == "anchor":
            if self.layer_zero is None or self.layer_zero.value is None:
                raise ValueError("rule='anchor' needs the first block's input: call "
                                 "unrollattn.layers.attach_layer_zero_input(model.blocks) after building the model")
            return u + self.strength * (self.layer_zero.value - x)
        return u

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.residual_branch(self.boosted_attention(x, attn_mask, is_causal), self.ls1, self.drop_path1)
        if self.mlp is None:
            return x
        return x + self.residual_branch(self.mlp(self.norm2(x)), self.ls2, self.drop_path2)

    def decode(self, x, cache, layer_idx, attn_mask=None):
        """Recomputes the block over its cached inputs (it calls its attention more than once). With rule='anchor'
        the first block's cached inputs are the layer-0 input of the whole prefix, which every block pulls toward."""
        prefix, prefix_mask = cached_prefix(cache, layer_idx, x, attn_mask)
        if self.layer_zero is not None and layer_idx == 0:
            self.layer_zero.set(prefix)
        return self(prefix, attn_mask=prefix_mask, is_causal=True)[:, -x.shape[1]:]
