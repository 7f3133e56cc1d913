"""Recipe "classify": image classification with ViT / AoT-MSSA / AoT-MHSA / CRATE backbones.

Single process (CPU or one GPU)::

    python -m unrollattn.recipes.classify --preset quick model.variant=crate
    unrollattn train classify --preset fmnist_tiny model.variant=aot_mssa optim.lr=5e-4

DDP, one process per device (``loop.batch_size`` is the global batch)::

    torchrun --standalone --nproc_per_node=2 -m unrollattn.recipes.classify --preset digits_debug loop.device=cpu

Ablation over the variants (one table + plot): ``unrollattn ablate classify --variants vit,crate --preset quick``;
the kernel-regression ViTs by their short names (``gaussian``, ``mahalanobis``, ``bilateral``, ``twicing``:
timm's ViT with that attention, same width / depth / MLP as ``vit``), e.g.
``unrollattn ablate classify --variants vit,bilateral,gaussian,twicing --preset quick``.
Presets: ``quick`` (CPU, minutes per variant), ``digits_debug`` (seconds), ``fmnist_tiny`` and
``fmnist_small`` (GPU, 30 epochs). Data sources are those of :mod:`unrollattn.vision.datasets`.

Robustness (``robust.*``): after training, the final weights are attacked with FGSM and PGD (L-inf, pixel
space [0, 1], the recipe's normalisation applied inside the attacked function) at each ``robust.eps`` on a
fixed random subset of ``robust.num_images`` test images. Summary keys: ``adv_subset_top1`` (clean top-1 on
that subset), ``fgsm_top1@2/255``, ``pgd_top1@2/255``, ...; also written to ``robustness.json`` in the run
directory. ``robust.num_images=0`` or ``robust.eps=()`` turns it off.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

import unrollattn  # noqa: F401  (registers the aot_* / crate_* timm models)
from unrollattn.diagnostics.robustness import ATTACKS, adversarial_counts, check_eps, eps_label
from unrollattn.registry import (
    ATTENTIONS, BLOCKS, Registry, UnknownNameError, composable_model, model_variants, resolve_variant, variant_fields,
)
from unrollattn.utils.params import layer_stack, matching_shape, stack_parameters
from unrollattn.train import (
    LoopConfig, OptimConfig, apply_overrides, epoch_batch_indices, fit, load_latest_weights, read_run_config,
    recipe_main,
)
from unrollattn.utils.dist import DistState, all_reduce_tensor, global_batch_seed, micro_batch_slice
from unrollattn.utils.io import atomic_write_json
from unrollattn.vision.datasets import ImageClassificationData, load_classification_data

__all__ = [
    "DEFAULT_PRESET", "ClassifyConfig", "ClassifyTask", "DataConfig", "ModelConfig", "PRESETS", "RobustConfig",
    "block_stack_params", "matched_model", "parse_model_label", "reference_model",
    "VARIANTS", "VARIANT_KEY", "ablation_columns", "ablation_columns_for", "ablation_metric", "available_variants",
    "build_classifier", "evaluate_robustness", "load_config", "load_model", "main", "random_translate_flip",
    "with_data_config",
    "robust_keys", "run", "timm_name",
]

TASK = "classification"  # the registry task of this recipe's models


def available_variants() -> tuple[str, ...]:
    """Every registered classification variant (registry metadata ``variant``: vit, aot_mssa, crate, bilateral, ...),
    a user's own included."""
    return tuple(model_variants(TASK))


VARIANTS = available_variants()
VARIANT_KEY = "model.variant"
# summary key -> column header of the ablation table (comparison.md / .csv)
ablation_columns = {"params": "params", "params_stack": "block params", "params_reference": "reference blocks",
                    "depth": "depth", "top1": "top1 %", "val_loss": "val_loss", "train_items_per_s": "train img/s",
                    "peak_mem_mb": "peak mem MB", "wall_s": "wall s"}
ablation_metric = "top1"


DEFAULT_PRESET = "quick"  # what the recipe and `unrollattn ablate` run without --preset
PREPROCESSING_FILE = "preprocessing.json"


def robust_keys(robust: "RobustConfig") -> dict[str, str]:
    """Summary key -> table header of the adversarial evaluation of ``robust`` (empty when it is disabled)."""
    if not robust.enabled:
        return {}
    keys = {"adv_subset_top1": "subset top1 %"}
    for attack in robust.attacks:
        for eps in robust.eps:
            keys[f"{attack}_top1@{eps_label(eps)}"] = f"{attack.upper()} {eps_label(eps)} %"
    return keys


def ablation_columns_for(cfg: "ClassifyConfig") -> dict[str, str]:
    """Columns of ``unrollattn ablate classify``: ablation_columns with the robustness columns of ``cfg`` after val_loss."""
    columns = dict(ablation_columns)
    tail = {k: columns.pop(k) for k in ("train_items_per_s", "peak_mem_mb", "wall_s")}
    return {**columns, **robust_keys(cfg.robust), **tail}


@dataclasses.dataclass
class ModelConfig:
    """Backbone: a registered ``variant`` at ``size`` (``unrollattn list --kind models``), or, when ``attention`` /
    ``block`` are set, timm's ViT layout with that attention in that block (any registered names, a user's own
    included), or ``arch``: any timm model. ``embed_dim`` / ``depth`` / ``num_heads`` left at None keep the size's.
    ``match_params`` (a variant, or ``attention-block``): ``depth`` is the reference's depth and this model gets the
    depth whose blocks have the reference's parameters within 2% at the same width, or, where no depth does, the
    nearest width (a multiple of the heads) at which one does (:func:`matched_model`)."""

    variant: str = "vit"
    attention: str | None = None
    block: str | None = None
    size: str = "tiny"
    arch: str | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int = 4
    drop_path_rate: float = 0.0
    match_params: str | None = None
    patch_norm_eps: float | None = None  # the per-patch LayerNorm's epsilon (models with CRATE's patch embedding)

    def __post_init__(self):
        if self.composed:
            for registry, name in ((ATTENTIONS, self.attention), (BLOCKS, self.block)):
                if name is not None:
                    registry.get(name)  # an unknown name lists the closest registered ones
        elif self.arch is None and self.variant not in available_variants():
            raise ValueError(f"variant: expected one of {', '.join(available_variants())} "
                             f"(or set model.attention / model.block, or arch=<timm model name>), got {self.variant!r}")
        for key in ("embed_dim", "depth", "num_heads", "patch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: expected a positive int, got {value!r}")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate: expected a float in [0, 1), got {self.drop_path_rate!r}")
        if self.patch_norm_eps is not None and not 0 < self.patch_norm_eps < math.inf:
            raise ValueError(f"patch_norm_eps: expected a positive float or none, got {self.patch_norm_eps!r}")
        if self.match_params is not None:
            reference_model(self)

    @property
    def composed(self) -> bool:
        return self.arch is None and (self.attention is not None or self.block is not None)

    @property
    def label(self) -> str:
        """Name of this model in run names and tables: the variant, ``attention-block``, or the explicit arch."""
        if self.arch:
            return self.arch
        return f"{self.attention or 'mhsa'}-{self.block or 'transformer'}" if self.composed else self.variant


def parse_model_label(label: str) -> dict[str, Any]:
    """``ModelConfig`` fields of a label: a variant name, or ``attention-block``."""
    fields = variant_fields(label)
    return {**fields, "variant": fields["variant"] or ModelConfig.variant, "arch": None}


def reference_model(model: ModelConfig) -> ModelConfig:
    """The model ``match_params`` names, at ``model``'s size, width and heads with ``model.depth`` blocks."""
    return dataclasses.replace(model, **parse_model_label(model.match_params), match_params=None)


@dataclasses.dataclass
class DataConfig:
    """Data source (see ``unrollattn.vision.datasets``) and tensor augmentation: random translation by up to
    ``crop_padding`` pixels (= random crop of the zero-padded image) and, with ``hflip``, horizontal flips."""

    source: str = "auto"
    root: str | None = None
    max_train: int | None = None
    max_test: int | None = None
    img_size: int | None = None
    augment: bool = False
    crop_padding: int = 4
    hflip: bool = True
    eval_batch_size: int = 1000

    def __post_init__(self):
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding: expected an int >= 0, got {self.crop_padding!r}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: expected an int >= 1, got {self.eval_batch_size!r}")


@dataclasses.dataclass
class RobustConfig:
    """Adversarial evaluation after training: ``attacks`` (fgsm, pgd) at each budget ``eps`` (L-inf, pixel units in
    [0, 1] before normalisation: 1/255 = 0.0039) on ``num_images`` test images (a fixed random subset, seed 0);
    PGD takes ``pgd_steps`` steps of ``pgd_step_size`` (None: 2.5 eps / steps) from a random start.
    ``num_images=0`` or an empty ``eps`` / ``attacks`` disables it."""

    eps: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255)
    attacks: tuple[str, ...] = ATTACKS
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    num_images: int = 1000
    batch_size: int = 250

    def __post_init__(self):
        self.eps = tuple(check_eps(e) for e in self.eps)
        names = [eps_label(e) for e in self.eps]
        if len(set(names)) != len(names):
            raise ValueError(f"eps: expected distinct budgets, got {', '.join(names)}")
        self.attacks = tuple(self.attacks)
        if any(a not in ATTACKS for a in self.attacks) or len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks: expected distinct names from {', '.join(ATTACKS)}, got {list(self.attacks)}")
        if self.pgd_steps < 1:
            raise ValueError(f"pgd_steps: expected an int >= 1, got {self.pgd_steps!r}")
        if self.pgd_step_size is not None and not (math.isfinite(self.pgd_step_size) and self.pgd_step_size > 0):
            raise ValueError(f"pgd_step_size: expected a positive float or None, got {self.pgd_step_size!r}")
        if self.num_images < 0:
            raise ValueError(f"num_images: expected an int >= 0 (0 disables the attacks), got {self.num_images!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {self.batch_size!r}")

    @property
    def enabled(self) -> bool:
        return self.num_images > 0 and bool(self.eps) and bool(self.attacks)


@dataclasses.dataclass
class ClassifyConfig:
    """The whole run: model, data, training loop, optimizer and the adversarial evaluation."""

    preset: str = "custom"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    robust: RobustConfig = dataclasses.field(default_factory=RobustConfig)
    label_smoothing: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a float in [0, 1), got {self.label_smoothing!r}")


# ----------------------------------------------------------------------------------------------- model


def timm_name(model: ModelConfig) -> str:
    """The timm model name of ``model`` (checked to exist)."""
    if model.arch:
        if not timm.is_model(model.arch):
            raise ValueError(f"arch: {model.arch!r} is not a timm model name")
        return model.arch
    try:
        return composable_model(TASK, model.size) if model.composed else resolve_variant(TASK, model.variant, model.size)
    except UnknownNameError as err:
        raise ValueError(f"size: {err}") from None


def build_classifier(model: ModelConfig, *, num_classes: int, in_chans: int, img_size: tuple[int, int]) -> nn.Module:
    """The timm backbone of ``model`` for ``num_classes`` classes of ``in_chans`` x H x W images."""
    if img_size[0] % model.patch_size or img_size[1] % model.patch_size:
        raise ValueError(f"image size {img_size[0]}x{img_size[1]} is not divisible by model.patch_size={model.patch_size}"
                         " (set data.img_size or model.patch_size)")
    model = matched_model(model, in_chans=in_chans, img_size=img_size)
    dims = {k: getattr(model, k) for k in ("embed_dim", "num_heads", "depth", "patch_norm_eps")
            if getattr(model, k) is not None}
    if model.composed:
        dims.update({k: v for k, v in (("attention", model.attention), ("block", model.block)) if v is not None})
    try:
        return timm.create_model(timm_name(model), pretrained=False, num_classes=num_classes, img_size=tuple(img_size),
                                 in_chans=in_chans, patch_size=model.patch_size, drop_path_rate=model.drop_path_rate,
                                 **dims)
    except TypeError as err:
        if "patch_norm_eps" not in str(err):
            raise
        raise ValueError(f"model.patch_norm_eps: {timm_name(model)} has no per-patch LayerNorm (only the models "
                         "with CRATE's normalised patch embedding: aot_*, crate_*, attention/block compositions)") from None


def block_stack_params(model: ModelConfig, *, depth: int | None = None, in_chans: int = 3,
                       img_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(parameters of the blocks, number of blocks) of ``model`` (with ``depth`` blocks if given), on the meta device."""
    if depth is not None:
        model = dataclasses.replace(model, depth=depth, match_params=None)
    size = img_size or (4 * model.patch_size, 4 * model.patch_size)
    with torch.device("meta"):
        return stack_parameters(build_classifier(model, num_classes=10, in_chans=in_chans, img_size=size))


def matched_model(model: ModelConfig, *, in_chans: int = 3, img_size: tuple[int, int] | None = None) -> ModelConfig:
    """``model`` with ``match_params`` resolved: the depth whose blocks have the reference's parameters within 2%, and
    where no depth does, the width nearest the reference's that has one (:func:`matching_shape`), on the meta device."""
    if model.match_params is None:
        return model
    size = dict(in_chans=in_chans, img_size=img_size or (4 * model.patch_size, 4 * model.patch_size))
    target, _ = block_stack_params(reference_model(model), **size)
    with torch.device("meta"):
        probe = build_classifier(dataclasses.replace(model, depth=1, match_params=None), num_classes=10, **size)
    width = model.embed_dim or probe.embed_dim
    heads = model.num_heads or getattr(layer_stack(probe)[0].attn, "num_heads", 1)

    def per_block(embed_dim: int) -> int:
        shape = dataclasses.replace(model, embed_dim=embed_dim, num_heads=heads, match_params=None)
        return block_stack_params(shape, depth=1, **size)[0]

    depth, width_matched = matching_shape(per_block, target, width=width, width_step=heads)
    embed_dim = model.embed_dim if width_matched == width else width_matched
    return dataclasses.replace(model, depth=depth, embed_dim=embed_dim,
                               num_heads=model.num_heads if embed_dim == model.embed_dim else heads, match_params=None)


# ----------------------------------------------------------------------------------------------- task


def random_translate_flip(images: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Shift each image of ``images`` [B, C, H, W] by ``shift[b] = (dy, dx)`` pixels with zero fill (torchvision's
    crop of the zero-padded image), then mirror those with ``flip[b]`` left-right. The offsets come from the run's
    seeded sampler rather than torchvision's global RNG, so a resumed run draws the same augmentations."""
    if images.ndim != 4 or shift.shape != (images.shape[0], 2):
        raise ValueError(f"expected images [B, C, H, W] and shift [B, 2], got {list(images.shape)} and {list(shift.shape)}")
    h, w = images.shape[-2:]
    pad = int(shift.abs().max()) if shift.numel() else 0
    padded = TF.pad(images, [pad], fill=0)
    out = torch.stack([TF.crop(padded[b], pad + dy, pad + dx, h, w) for b, (dy, dx) in enumerate(shift.tolist())])
    if flip is not None:
        out = torch.where(flip.to(images.device)[:, None, None, None], TF.horizontal_flip(out), out)
    return out.contiguous()


class ClassifyTask:
    """The :class:`unrollattn.train.Task` of image classification (cross-entropy; top-1 and loss on the test split)."""

    loss_label = "cross-entropy (nats/image)"

    def __init__(self, cfg: ClassifyConfig, data: ImageClassificationData | None = None):
        self.cfg = cfg
        d = cfg.data
        self.data = data if data is not None else load_classification_data(
            d.source, root=d.root, max_train=d.max_train, max_test=d.max_test, img_size=d.img_size, seed=cfg.loop.seed)
        self._test_cache: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    def build_model(self) -> nn.Module:
        return with_data_config(build_classifier(self.cfg.model, num_classes=self.data.num_classes,
                                                 in_chans=self.data.in_chans, img_size=self.data.img_size),
                                self.preprocessing())

    def preprocessing(self) -> dict[str, Any]:
        """What a trained model expects of an input: size, channels, the training split's per-channel mean / std
        (inputs are pixels / 255, then (x - mean) / std), classes. Exported as ``preprocessing.json``."""
        mean, std = self.data.channel_stats()
        return {"input_size": [self.data.in_chans, *self.data.img_size], "mean": mean.tolist(), "std": std.tolist(),
                "num_classes": self.data.num_classes, "class_names": list(self.data.class_names or ()),
                "data": self.data.name}

    def heldout(self, count: int) -> dict[str, torch.Tensor]:
        """The first ``count`` test images (a fixed choice, for the diagnostics): ``inputs`` (normalised, what the
        model takes), ``display`` (pixels in [0, 1]) and ``labels``."""
        data = self.data
        if data.num_test == 0:
            raise ValueError(f"the run's data {data.name} has no test split")
        images = data.test_images[:count]
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return {"inputs": data.normalize(images), "display": pixels, "labels": data.test_labels[:count]}

    def run_info(self) -> dict[str, Any]:
        """The model and data of the run (summary and result.json): variant, timm name, depth and the parameters of
        its blocks (and of the reference's, with ``model.match_params``)."""
        model, size = self.cfg.model, dict(in_chans=self.data.in_chans, img_size=self.data.img_size)
        matched = matched_model(model, **size)
        with torch.device("meta"):
            built = build_classifier(matched, num_classes=self.data.num_classes, **size)
        stack, depth = stack_parameters(built)
        reference = block_stack_params(reference_model(model), **size)[0] if model.match_params else math.nan
        return {"variant": model.label, "arch": timm_name(model), "data": self.data.describe(), "depth": depth,
                "width": built.embed_dim, "params_stack": stack, "params_reference": reference,
                "matched_to": model.match_params}

    def final_evaluate(self, model: nn.Module, state: DistState) -> dict[str, float]:
        """FGSM / PGD accuracies of the trained model at ``robust.eps`` (:func:`evaluate_robustness`), when enabled."""
        self.robustness = evaluate_robustness(self, model, state) if self.cfg.robust.enabled else None
        return self.robustness or {}

    def export(self, model: nn.Module, run_dir: Path) -> None:
        """``preprocessing.json`` (:meth:`preprocessing`), so a run loads back without its data, and
        ``robustness.json`` when the final evaluation attacked the model."""
        atomic_write_json(Path(run_dir) / PREPROCESSING_FILE, self.preprocessing())
        if getattr(self, "robustness", None):
            atomic_write_json(Path(run_dir) / "robustness.json", {
                "config": dataclasses.asdict(self.cfg.robust), "num_images": len(self.robust_subset()),
                **self.robustness})

    def batch(self, step: int, micro: int, state: DistState) -> dict[str, torch.Tensor]:
        loop, aug = self.cfg.loop, self.cfg.data
        idx = epoch_batch_indices(self.data.num_train, loop.batch_size, step, micro, loop.grad_accum, state.rank,
                                  state.world_size, loop.seed)
        out = {"images": self.data.train_images[idx], "labels": self.data.train_labels[idx]}
        if aug.augment:
            keep = micro_batch_slice(loop.batch_size, loop.grad_accum, state.world_size, micro, state.rank)
            gen = torch.Generator().manual_seed(global_batch_seed(loop.seed, step))
            p = aug.crop_padding
            out["shift"] = torch.randint(-p, p + 1, (loop.batch_size, 2), generator=gen)[keep]
            out["flip"] = (torch.rand(loop.batch_size, generator=gen) < 0.5)[keep] & aug.hflip
        return out

    def inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augmented (when the batch carries shifts / flips) and normalised float images."""
        images = batch["images"]
        if "shift" in batch:
            images = random_translate_flip(images, batch["shift"], batch.get("flip"))
        return self.data.normalize(images)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(self.inputs(batch))
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.cfg.label_smoothing), {}

    def evaluate(self, model: nn.Module, state: DistState) -> dict[str, float]:
        images, labels = self._test_split(state.device)
        if labels.numel() == 0:
            return {}
        totals = torch.zeros(3, dtype=torch.float64, device=state.device)  # loss sum, correct, count
        shard = torch.arange(state.rank, labels.numel(), state.world_size, device=state.device)
        for idx in shard.split(self.cfg.data.eval_batch_size):
            logits = model(self.data.normalize(images[idx])).float()
            y = labels[idx]
            totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
            totals[1] += (logits.argmax(dim=-1) == y).sum()
            totals[2] += y.numel()
        loss_sum, correct, count = all_reduce_tensor(totals, state, "sum").tolist()
        return {"top1": 100.0 * correct / count, "val_loss": loss_sum / count}

    def robust_subset(self) -> torch.Tensor:
        """Indices of the test images attacked by :func:`evaluate_robustness`: a fixed random subset (seed 0) of
        ``robust.num_images`` (all when the split is smaller), sorted."""
        n = min(self.cfg.robust.num_images, self.data.num_test)
        return torch.randperm(self.data.num_test, generator=torch.Generator().manual_seed(0))[:n].sort().values

    def items_per_batch(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def _test_split(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test_cache is None or self._test_cache[0] != device:
            self._test_cache = (device, self.data.test_images.to(device), self.data.test_labels.to(device))
        return self._test_cache[1], self._test_cache[2]


def evaluate_robustness(task: ClassifyTask, model: nn.Module, state: DistState) -> dict[str, float]:
    """Top-1 (%) of ``model`` on ``task``'s attacked subset, clean (``adv_subset_top1``) and under each attack and
    budget of ``task.cfg.robust`` (``fgsm_top1@2/255``, ``pgd_top1@2/255``, ...); {} when disabled.

    Pixels in [0, 1] are attacked; the task's normalisation runs inside the attacked function. Under DDP each rank
    attacks its share of the subset and the counts are summed over ranks (call it on every rank).
    """
    robust = task.cfg.robust
    if not robust.enabled or task.data.num_test == 0:
        return {}
    idx = task.robust_subset()[state.rank::state.world_size]
    images = task.data.test_images[idx]
    pixels = (images.float() / 255.0 if images.dtype == torch.uint8 else images.float()).to(state.device)
    counts = adversarial_counts(model, pixels, task.data.test_labels[idx].to(state.device), robust.eps,
                                attacks=robust.attacks, batch_size=robust.batch_size, preprocess=task.data.normalize,
                                seed=task.cfg.loop.seed + state.rank, steps=robust.pgd_steps,
                                step_size=robust.pgd_step_size)
    names = ["clean", *(f"{a}@{eps_label(e)}" for a in robust.attacks for e in robust.eps)]
    totals = all_reduce_tensor(torch.tensor([counts["count"], *(counts[k] for k in names)], dtype=torch.float64),
                               state, "sum").tolist()
    total = max(totals[0], 1.0)
    keys = list(robust_keys(robust))  # adv_subset_top1, then the attacks in the order of ``names``
    return {key: 100.0 * correct / total for key, correct in zip(keys, totals[1:])}


# ----------------------------------------------------------------------------------------------- presets

PRESETS = Registry("classify preset")


@PRESETS.register("quick")
def quick() -> ClassifyConfig:
    """CPU: Fashion-MNIST (digits if absent), width 96, depth 4, 4 heads, patch 4 (49 tokens), 400 steps of 128
    images (~0.85 epoch), evaluated on the full test split, then FGSM and 10-step PGD at 1, 2, 4 / 255 on 1000 test
    images. On 2 idle cores: ViT ~2 min, AoT / CRATE ~1 min each, plus about a minute of attacks."""
    return ClassifyConfig(
        preset="quick",
        model=ModelConfig(variant="vit", embed_dim=96, depth=4, num_heads=4, patch_size=4),
        data=DataConfig(source="auto", augment=False),
        loop=LoopConfig(max_steps=400, batch_size=128, eval_every=0, log_every=25, ckpt_every=0),
        optim=OptimConfig(lr=2e-3, weight_decay=0.05, warmup_steps=40, schedule="cosine", min_lr_ratio=0.05,
                          grad_clip=1.0),
    )


@PRESETS.register("digits_debug")
def digits_debug() -> ClassifyConfig:
    """Seconds: scikit-learn digits (8x8), width 32, depth 2, patch 4 (4 tokens), 20 steps (tests, smoke runs)."""
    return ClassifyConfig(
        preset="digits_debug",
        model=ModelConfig(variant="vit", embed_dim=32, depth=2, num_heads=2, patch_size=4),
        data=DataConfig(source="digits", augment=False, eval_batch_size=512),
        loop=LoopConfig(max_steps=20, batch_size=64, eval_every=10, log_every=5, ckpt_every=0, progress=False),
        optim=OptimConfig(lr=1e-2, weight_decay=0.01, warmup_steps=2, min_lr_ratio=0.1),
        robust=RobustConfig(eps=(8 / 255,), pgd_steps=3, num_images=128, batch_size=128),
    )


def _fmnist_gpu(preset: str, size: str) -> ClassifyConfig:
    batch, epochs, train_items = 256, 30, 60_000
    steps_per_epoch = math.ceil(train_items / batch)
    return ClassifyConfig(
        preset=preset,
        model=ModelConfig(variant="vit", size=size, patch_size=4, drop_path_rate=0.1),
        data=DataConfig(source="fashion_mnist", augment=True, crop_padding=4, hflip=True),
        loop=LoopConfig(max_steps=epochs * steps_per_epoch, batch_size=batch, eval_every=steps_per_epoch,
                        log_every=50, ckpt_every=5 * steps_per_epoch, precision="bf16"),
        optim=OptimConfig(lr=1e-3, weight_decay=0.05, warmup_steps=3 * steps_per_epoch, min_lr_ratio=0.01),
        label_smoothing=0.1,
    )


@PRESETS.register("fmnist_tiny")
def fmnist_tiny() -> ClassifyConfig:
    """GPU: each family's published tiny size at patch 4 on 28 px Fashion-MNIST, 30 epochs, bf16, crop + flip."""
    return _fmnist_gpu("fmnist_tiny", "tiny")


@PRESETS.register("fmnist_small")
def fmnist_small() -> ClassifyConfig:
    """GPU: as fmnist_tiny with each family's small size."""
    return _fmnist_gpu("fmnist_small", "small")


# ----------------------------------------------------------------------------------------------- entry points


def load_config(preset: str = DEFAULT_PRESET, overrides: Sequence[str] | None = None, *, resume: bool = False) -> ClassifyConfig:
    """Preset ``preset`` with ``key=value`` overrides applied (``resume`` sets ``loop.resume``)."""
    cfg = apply_overrides(PRESETS.get(preset)(), list(overrides or []))
    return apply_overrides(cfg, ["loop.resume=true"]) if resume else cfg


def run(cfg: ClassifyConfig) -> dict[str, Any]:
    """Train and evaluate ``cfg``; return fit's summary (also result.json) with the model description
    (:meth:`ClassifyTask.run_info`) and, when ``cfg.robust`` is enabled, the adversarial accuracies of the final model
    (:meth:`ClassifyTask.final_evaluate`, also in ``robustness.json``; its time is part of ``wall_s``)."""
    task = ClassifyTask(cfg)
    return fit(task, cfg.loop, cfg.optim, run_name_prefix=f"classify-{cfg.preset}-{cfg.model.label}",
               config_for_log=cfg)


def with_data_config(model: nn.Module, preprocessing: dict[str, Any]) -> nn.Module:
    """Record the input size and normalisation in timm's ``model.pretrained_cfg``, so
    ``timm.data.resolve_model_data_config(model)`` (and timm's transforms built from it) give the run's."""
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "input_size": tuple(preprocessing["input_size"]),
                            "mean": tuple(preprocessing["mean"]), "std": tuple(preprocessing["std"]),
                            "num_classes": preprocessing["num_classes"], "crop_pct": 1.0}
    return model


def load_model(run_dir: str | Path) -> tuple[nn.Module, ClassifyConfig]:
    """The trained model of a finished (or checkpointed) run directory, in eval mode, with its config.

    Finished runs carry ``preprocessing.json`` (classes, input size, mean / std; also in ``model.pretrained_cfg``)
    and load without their data; older or unfinished runs rebuild the data to learn classes and image size."""
    cfg = read_run_config(run_dir, ClassifyConfig, "classify")
    path = Path(run_dir) / PREPROCESSING_FILE
    if path.is_file():
        prep = json.loads(path.read_text())
        channels, *size = prep["input_size"]
        model = with_data_config(build_classifier(cfg.model, num_classes=prep["num_classes"], in_chans=channels,
                                                  img_size=tuple(size)), prep)
    else:
        model = ClassifyTask(cfg).build_model()  # the data fixes classes, channels and image size
    return load_latest_weights(run_dir, model).eval(), cfg


def make_task(cfg: ClassifyConfig) -> ClassifyTask:
    """The task of ``cfg`` (it loads the run's data): what the diagnostics ask for held-out examples."""
    return ClassifyTask(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``[--preset NAME] [--resume] [key=value ...]``; prints the summary as JSON."""
    return recipe_main(argv, prog="python -m unrollattn.recipes.classify", description=__doc__.split("\n\n")[0], presets=PRESETS,
                       default_preset=DEFAULT_PRESET, load_config=load_config, run=run)


if __name__ == "__main__":
    from unrollattn.utils.errors import exit_on_error

    sys.exit(exit_on_error(main))
