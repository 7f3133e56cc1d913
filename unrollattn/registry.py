"""The one registry of unrollattn: attention variants, blocks, models, HF attention functions, recipes and
diagnostics by name.

Every family registers here; timm and HF names are generated from these entries, never kept in a
second table. Recipes and diagnostics sit above the library, so they are registered as module paths
(read from the ``unrollattn.recipes`` / ``unrollattn.diagnostics`` entry points, or added with
:func:`register_recipe`) and imported only when one is run: nothing here imports upward.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Iterator


class UnknownNameError(KeyError, ValueError):
    """Raised for a name that is not registered; the message lists the closest registered names."""

    def __str__(self) -> str:  # KeyError would otherwise print the message quoted
        return str(self.args[0]) if self.args else ""


class Registry:
    """A name -> object table with helpful errors for near-miss names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, obj: Any = None, *, overwrite: bool = False, **meta):
        """Register ``obj`` under ``name``; without ``obj`` it returns a decorator."""

        def add(target):
            key = name or getattr(target, "__name__", None)
            if not key:
                raise ValueError(f"{self.kind} registry needs a name for {target!r}")
            if key in self._entries and self._entries[key] is not target and not overwrite:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = target
            self._meta[key] = dict(meta)
            return target

        return add(obj) if obj is not None else add

    def get(self, name: str) -> Any:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=5, cutoff=0.4)
            hint = f"closest: {', '.join(close)}" if close else f"registered: {', '.join(sorted(self._entries)) or '(none)'}"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; {hint}") from None

    def unregister(self, name: str) -> Any:
        """Remove ``name`` (an unknown name is an error listing the registered ones); returns what it held."""
        target = self.get(name)
        del self._entries[name], self._meta[name]
        return target

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self, pattern: str | None = None) -> list[str]:
        names = sorted(self._entries)
        if pattern:
            names = [n for n in names if fnmatch.fnmatchcase(n, pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")]
        return names

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


ATTENTIONS = Registry("attention")
BLOCKS = Registry("block")
MODELS = Registry("model")
HF_KERNELS = Registry("HF attention function")
RECIPES = Registry("recipe")
DIAGNOSTICS = Registry("diagnostic")

_ENTRY_POINT_GROUPS = {"recipe": "unrollattn.recipes", "diagnostic": "unrollattn.diagnostics"}


def _load_entry_points(registry: Registry) -> Registry:
    """Add the module paths that installed distributions declare for ``registry`` (entry point group
    ``unrollattn.recipes`` or ``unrollattn.diagnostics``: ``name = "package.module"``), without importing them."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=_ENTRY_POINT_GROUPS[registry.kind]):
        if ep.name not in registry:
            registry.register(ep.name, ep.value)
    return registry


def register_recipe(name: str, module: str, *, overwrite: bool = False) -> str:
    """Make module path ``module`` (with ``PRESETS``, ``load_config``, ``run``, ``main``; see
    ``unrollattn/recipes/README.md``) runnable as ``unrollattn train NAME`` / ``unrollattn ablate NAME``."""
    return RECIPES.register(name, module, overwrite=overwrite)


def register_diagnostic(name: str, module: str, *, overwrite: bool = False) -> str:
    """Make module path ``module`` (with ``main(argv)``) runnable as ``unrollattn diagnose NAME``."""
    return DIAGNOSTICS.register(name, module, overwrite=overwrite)


def recipe_module(name: str) -> str:
    """The module path of recipe ``name``; an unknown name lists the recipes."""
    return _load_entry_points(RECIPES).get(name)


def list_recipes() -> list[str]:
    return _load_entry_points(RECIPES).names()


def diagnostic_module(name: str) -> str:
    return _load_entry_points(DIAGNOSTICS).get(name)


def list_diagnostics() -> list[str]:
    return _load_entry_points(DIAGNOSTICS).names()


def register_attention(name: str, **meta) -> Callable:
    return ATTENTIONS.register(name, **meta)


def register_block(name: str, **meta) -> Callable:
    return BLOCKS.register(name, **meta)


def register_model(name: str | None = None, *, family: str, task: str, **meta) -> Callable:
    """Register a model builder ``fn(**overrides) -> nn.Module`` under ``name`` (default: its __name__)."""
    return MODELS.register(name, family=family, task=task, **meta)


def get_attention(name_or_cls) -> type:
    """Attention layer class by registered name (a class passes through unchanged)."""
    return name_or_cls if isinstance(name_or_cls, type) else ATTENTIONS.get(name_or_cls)


def get_block(name_or_cls) -> type:
    return name_or_cls if isinstance(name_or_cls, type) else BLOCKS.get(name_or_cls)


def list_attentions(pattern: str | None = None) -> list[str]:
    return ATTENTIONS.names(pattern)


def list_blocks(pattern: str | None = None) -> list[str]:
    return BLOCKS.names(pattern)


def list_models(pattern: str | None = None, *, family: str | None = None, task: str | None = None) -> list[str]:
    """Registered model names, filtered by a glob/substring ``pattern``, family and task."""
    names = MODELS.names(pattern)
    if family is not None:
        names = [n for n in names if MODELS.meta(n).get("family") == family]
    if task is not None:
        names = [n for n in names if MODELS.meta(n).get("task") == task]
    return names


def model_variants(task: str) -> list[str]:
    """The short variant names (metadata ``variant``, e.g. ``aot_mssa``, ``bilateral``, ``gpt2``) of ``task``'s models."""
    return sorted({MODELS.meta(n)["variant"] for n in list_models(task=task) if MODELS.meta(n).get("variant")})


def resolve_variant(task: str, variant: str, size: str, *, size_label: str = "size") -> str:
    """The registered model of ``task`` whose metadata says ``variant`` at ``size`` (e.g. classification, crate,
    tiny -> crate_tiny_patch16_224); an error lists the registered variants or that variant's sizes."""
    names = [n for n in list_models(task=task) if MODELS.meta(n).get("variant") == variant]
    if not names:
        known = model_variants(task)
        close = difflib.get_close_matches(variant, known, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownNameError(f"unknown {task} variant {variant!r}; {hint}registered: {', '.join(known)}")
    sized = [n for n in names if MODELS.meta(n).get("size") == size]
    if len(sized) != 1:
        sizes = sorted({MODELS.meta(n).get("size") for n in names} - {None})
        raise UnknownNameError(f"{task} variant {variant!r} has no {size_label} {size!r}; available: {', '.join(sizes)}")
    return sized[0]


def composable_model(task: str, size: str) -> str:
    """The registered model of ``task`` at ``size`` that takes any ``attention=`` and ``block=`` (metadata
    ``composable``), e.g. classification -> vit_unrolled_tiny_patch16_224, causal-lm -> unrollattn_lm_tiny."""
    names = [n for n in list_models(task=task) if MODELS.meta(n).get("composable")]
    sized = [n for n in names if MODELS.meta(n).get("size") == size]
    if len(sized) != 1:
        sizes = sorted({MODELS.meta(n).get("size") for n in names} - {None})
        raise UnknownNameError(f"no {task} model composes attention x block at size {size!r}; sizes: {', '.join(sizes)}")
    return sized[0]


def variant_fields(label: str) -> dict[str, str | None]:
    """The model fields a variant label names: ``attention-block`` (registered names never contain '-'), or a
    registered variant."""
    if "-" in label:
        attention, block = label.split("-", 1)
        return {"variant": None, "attention": attention, "block": block}
    return {"variant": label, "attention": None, "block": None}


def import_modules(names: str | list[str]) -> None:
    """Import each module of a comma-separated list (``--import``): one that registers a user's own attention,
    block, model or recipe makes it available by name."""
    import importlib

    for name in (n.strip() for n in (names.split(",") if isinstance(names, str) else names)):
        if name:
            try:
                importlib.import_module(name)
            except ImportError as err:
                raise ValueError(f"--import {name}: {err}") from None


def build_model(name: str, **overrides):
    """Build a registered model with keyword overrides (e.g. ``num_classes=10, img_size=28``)."""
    return MODELS.get(name)(**overrides)
