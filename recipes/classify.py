"""Recipe "classify": image classification with ViT / AoT-MSSA / AoT-MHSA / CRATE backbones.

Single process (CPU or one GPU)::

    python -m recipes.classify --preset quick model.variant=crate
    unrollattn train classify --preset fmnist_tiny model.variant=aot_mssa optim.lr=5e-4

DDP, one process per device (``loop.batch_size`` is the global batch)::

    torchrun --standalone --nproc_per_node=2 -m recipes.classify --preset digits_debug loop.device=cpu

Ablation over the variants (one table + plot): ``unrollattn ablate classify --variants vit,crate --preset quick``.
Presets: ``quick`` (CPU, minutes per variant), ``digits_debug`` (seconds), ``fmnist_tiny`` and
``fmnist_small`` (GPU, 30 epochs). Data sources are those of :mod:`unrollattn.vision.datasets`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

import unrollattn  # noqa: F401  (registers the aot_* / crate_* timm models)
from unrollattn.registry import Registry
from unrollattn.train import (
    DistState, LoopConfig, OptimConfig, all_reduce_tensor, apply_overrides, config_from_dict, epoch_batch_indices, fit,
    latest_checkpoint, load_checkpoint, recipe_main, step_seed,
)
from unrollattn.vision.datasets import ImageClassificationData, load_classification_data

__all__ = [
    "ClassifyConfig", "ClassifyTask", "DataConfig", "ModelConfig", "PRESETS", "VARIANTS", "VARIANT_KEY",
    "ablation_columns", "ablation_metric", "available_variants", "build_classifier", "load_config", "load_model", "main",
    "random_translate_flip", "run", "timm_name",
]

# The model of variant v at size s is the timm model f"{v}_{s}_patch16_224" (patch and image size are overridden).
VARIANTS = ("vit", "aot_mssa", "aot_mhsa", "crate")
_FAMILY_NAME = re.compile(r"(?P<variant>.+)_(?P<size>tiny|small|base|large)_patch16_224")
VARIANT_KEY = "model.variant"
# summary key -> column header of the ablation table (comparison.md / .csv)
ablation_columns = {"params": "params", "top1": "top1 %", "val_loss": "val_loss", "train_items_per_s": "train img/s",
                    "peak_mem_mb": "peak mem MB", "wall_s": "wall s"}
ablation_metric = "top1"


def available_variants() -> tuple[str, ...]:
    """VARIANTS, then every other registered unrollattn classification family (e.g. vit_bilateral)."""
    found = {m["variant"] for name in unrollattn.list_models(task="classification")
             if (m := _FAMILY_NAME.fullmatch(name))}
    return VARIANTS + tuple(sorted(found - set(VARIANTS)))


@dataclasses.dataclass
class ModelConfig:
    """Backbone: ``variant`` + ``size`` pick ``{variant}_{size}_patch16_224`` (or ``arch`` names any timm model);
    ``embed_dim`` / ``depth`` / ``num_heads`` left at None keep that size's values."""

    variant: str = "vit"
    size: str = "tiny"
    arch: str | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int = 4
    drop_path_rate: float = 0.0

    def __post_init__(self):
        if self.arch is None and self.variant not in available_variants():
            raise ValueError(f"variant: expected one of {', '.join(available_variants())} "
                             f"(or set arch=<timm model name>), got {self.variant!r}")
        for key in ("embed_dim", "depth", "num_heads", "patch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: expected a positive int, got {value!r}")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate: expected a float in [0, 1), got {self.drop_path_rate!r}")

    @property
    def label(self) -> str:
        """Name of this model in run names and tables: the variant, or the explicit arch."""
        return self.arch or self.variant


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
class ClassifyConfig:
    """The whole run: model, data, training loop and optimizer."""

    preset: str = "custom"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    label_smoothing: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a float in [0, 1), got {self.label_smoothing!r}")


# ----------------------------------------------------------------------------------------------- model


def timm_name(model: ModelConfig) -> str:
    """The timm model name of ``model`` (checked to exist)."""
    name = model.arch or f"{model.variant}_{model.size}_patch16_224"
    if not timm.is_model(name):
        if model.arch:
            raise ValueError(f"arch: {name!r} is not a timm model name")
        sizes = sorted({m["size"] for n in timm.list_models(f"{model.variant}_*_patch16_224")
                        if (m := _FAMILY_NAME.fullmatch(n)) and m["variant"] == model.variant})
        raise ValueError(f"size: {model.variant} has no size {model.size!r}; available: {', '.join(sizes)}")
    return name


def build_classifier(model: ModelConfig, *, num_classes: int, in_chans: int, img_size: tuple[int, int]) -> nn.Module:
    """The timm backbone of ``model`` for ``num_classes`` classes of ``in_chans`` x H x W images."""
    if img_size[0] % model.patch_size or img_size[1] % model.patch_size:
        raise ValueError(f"image size {img_size[0]}x{img_size[1]} is not divisible by model.patch_size={model.patch_size}"
                         " (set data.img_size or model.patch_size)")
    dims = {k: getattr(model, k) for k in ("embed_dim", "depth", "num_heads") if getattr(model, k) is not None}
    return timm.create_model(timm_name(model), pretrained=False, num_classes=num_classes, img_size=tuple(img_size),
                             in_chans=in_chans, patch_size=model.patch_size, drop_path_rate=model.drop_path_rate,
                             **dims)


# ----------------------------------------------------------------------------------------------- task


def random_translate_flip(images: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Shift each image of ``images`` [B, C, H, W] by ``shift[b] = (dy, dx)`` pixels with zero fill (a random
    crop of the zero-padded image), then mirror those with ``flip[b]`` left-right."""
    if images.ndim != 4 or shift.shape != (images.shape[0], 2):
        raise ValueError(f"expected images [B, C, H, W] and shift [B, 2], got {list(images.shape)} and {list(shift.shape)}")
    b, _, h, w = images.shape
    shift = shift.to(images.device)
    rows = torch.arange(h, device=images.device) + shift[:, :1]  # [B, H]
    cols = torch.arange(w, device=images.device) + shift[:, 1:]  # [B, W]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # [B, H, W]
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = images[batch, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # [B, H, W, C]
    out = (out * inside[..., None].to(out.dtype)).permute(0, 3, 1, 2)
    if flip is not None:
        out = torch.where(flip.to(images.device)[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


class ClassifyTask:
    """The :class:`unrollattn.train.Task` of image classification (cross-entropy; top-1 and loss on the test split)."""

    def __init__(self, cfg: ClassifyConfig, data: ImageClassificationData | None = None):
        self.cfg = cfg
        d = cfg.data
        self.data = data if data is not None else load_classification_data(
            d.source, root=d.root, max_train=d.max_train, max_test=d.max_test, img_size=d.img_size, seed=cfg.loop.seed)
        self._test_cache: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    def build_model(self) -> nn.Module:
        return build_classifier(self.cfg.model, num_classes=self.data.num_classes, in_chans=self.data.in_chans,
                                img_size=self.data.img_size)

    def batch(self, step: int, micro: int, state: DistState) -> dict[str, torch.Tensor]:
        loop, aug = self.cfg.loop, self.cfg.data
        idx = epoch_batch_indices(self.data.num_train, loop.batch_size, step, micro, loop.grad_accum, state.rank,
                                  state.world_size, loop.seed)
        out = {"images": self.data.train_images[idx], "labels": self.data.train_labels[idx]}
        if aug.augment:
            gen = torch.Generator().manual_seed(step_seed(loop.seed, step * loop.grad_accum + micro, state.rank))
            p = aug.crop_padding
            out["shift"] = torch.randint(-p, p + 1, (idx.numel(), 2), generator=gen)
            out["flip"] = (torch.rand(idx.numel(), generator=gen) < 0.5) & aug.hflip
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

    def items_per_batch(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def _test_split(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test_cache is None or self._test_cache[0] != device:
            self._test_cache = (device, self.data.test_images.to(device), self.data.test_labels.to(device))
        return self._test_cache[1], self._test_cache[2]


# ----------------------------------------------------------------------------------------------- presets

PRESETS = Registry("classify preset")


@PRESETS.register("quick")
def quick() -> ClassifyConfig:
    """CPU: Fashion-MNIST (digits if absent), width 96, depth 4, 4 heads, patch 4 (49 tokens), 400 steps of 128
    images (~0.85 epoch), evaluated on the full test split. On 2 idle cores: ViT ~2 min, AoT / CRATE ~1 min each."""
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


def load_config(preset: str = "quick", overrides: Sequence[str] | None = None, *, resume: bool = False) -> ClassifyConfig:
    """Preset ``preset`` with ``key=value`` overrides applied (``resume`` sets ``loop.resume``)."""
    cfg = apply_overrides(PRESETS.get(preset)(), list(overrides or []))
    return apply_overrides(cfg, ["loop.resume=true"]) if resume else cfg


def run(cfg: ClassifyConfig) -> dict[str, Any]:
    """Train and evaluate ``cfg``; return fit's summary plus ``variant``, ``arch`` and ``data``."""
    task = ClassifyTask(cfg)
    summary = fit(task, cfg.loop, cfg.optim, run_name_prefix=f"classify-{cfg.preset}-{cfg.model.label}",
                  config_for_log=cfg)
    return {"variant": cfg.model.label, "arch": timm_name(cfg.model), "data": task.data.describe(), **summary}


def load_model(run_dir: str | Path) -> tuple[nn.Module, ClassifyConfig]:
    """The trained model of a finished (or checkpointed) run directory, in eval mode, with its config."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: expected a classify run directory")
    cfg = config_from_dict(ClassifyConfig, json.loads(config_path.read_text()))
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    model = ClassifyTask(cfg).build_model()  # the data fixes classes, channels and image size
    load_checkpoint(ckpt, model=model)
    return model.eval(), cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``[--preset NAME] [--resume] [key=value ...]``; prints the summary as JSON."""
    return recipe_main(argv, prog="python -m recipes.classify", description=__doc__.split("\n\n")[0], presets=PRESETS,
                       default_preset="quick", load_config=load_config, run=run)


if __name__ == "__main__":
    from unrollattn.cli import exit_on_error

    sys.exit(exit_on_error(main))
