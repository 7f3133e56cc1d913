"""Recipe "restore": Bayer demosaicking and ×2 interpolation with uGLR / uGTV vs baselines (docs/papers.md A.6).

Single process (CPU or one GPU)::

    python -m unrollattn.recipes.restore --preset demosaic_quick model.variant=uglr
    unrollattn train restore --preset sr2_quick model.variant=ugtv model.heads=4

DDP (``loop.batch_size`` is the global batch; evaluation photos are sharded over the ranks)::

    torchrun --standalone --nproc_per_node=2 -m unrollattn.recipes.restore --preset demosaic_quick loop.device=cpu

Where the noise-shift loss comes from (noise gain on the samples vs the interpolated pixels of trained runs)::

    python -m unrollattn.recipes.restore noise-gain runs/ablate-restore-demosaic_quick/uglr runs/ablate-restore-demosaic_quick/transformer

Ablation, one table + plots::

    unrollattn ablate restore --variants uglr,ugtv,transformer,bicubic,malvar --preset demosaic_quick

Variants (``model.variant``): ``uglr``, ``ugtv`` (:mod:`unrollattn.vision.restoration`), ``transformer``
(timm Swin blocks), ``bilinear``, ``bicubic``, and for demosaicking ``malvar`` / ``menon``
(colour-demosaicing) — the last four have no parameters and run through the same ``fit`` with
``loop.max_steps=0``: evaluated once by the same :meth:`RestoreTask.evaluate` as the trained ones, no checkpoint.

Data: :mod:`unrollattn.vision.photos` (fixed split by photo; random ``data.crop`` training crops drawn
from a generator seeded by (seed, step) for the global batch, each micro-batch and rank cutting its slice, so
resuming is exact, also on another number of ranks). Training uses clean
samples. Evaluation on the test photos (centre ``data.eval_crop`` crops): PSNR and SSIM from
scikit-image (``peak_signal_noise_ratio`` / ``structural_similarity`` with ``data_range=1``,
``channel_axis``) on outputs clipped to [0, 1], float64, ignoring ``data.border`` pixels at each image
side, on RGB or, with ``data.metric_channels="y"``, on the BT.601 luma Y of ``skimage.color.rgb2ycbcr``, averaged
over photos (the long presets follow the field: RGB with no border for demosaicking, Y with a border of the scale
factor 2 for ×2; the quick presets score RGB inside a border of 4); seconds per megapixel of the forward pass (clean input, batch 1, includes
the bilinear initialisation; for ×2 an odd-sized photo is reflect-padded to even sizes and the output
cropped back, :meth:`RestoreTask.observe`); covariate shift: Gaussian noise of σ ∈ ``data.noise_sigmas`` (/255) added
to the samples y (seeded per photo and σ) -> ``psnr_sigma{σ}`` and ``psnr_drop_sigma{σ}`` = clean PSNR − noisy PSNR.

Every run also writes ``restoration_samples.npz`` (a crop of the figure photo: ground truth, input
mosaic/grid, output) and refreshes ``restorations_<task>_<preset>.png`` in ``loop.out_dir`` with the
crops of every run there of the same task and preset (so an ablation directory ends with one figure
of all methods next to the ground truth).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import unrollattn
import unrollattn.vision.restoration_baselines  # noqa: F401  (registers the restoration models)
from unrollattn.registry import MODELS, Registry, UnknownNameError, model_variants, resolve_variant
from unrollattn.train import (
    LoopConfig, OptimConfig, apply_overrides, count_params, fit, load_latest_weights,
    read_run_config, recipe_main,
)
from unrollattn.utils.dist import DistState, all_reduce_tensor, global_batch_seed, micro_batch_slice
from unrollattn.utils.io import atomic_path
from unrollattn.utils.plots import new_figure, save_figure
from unrollattn.utils.tables import markdown_table
from unrollattn.vision.photos import PhotoDataset, load_photos
from unrollattn.vision.sampling import crop_to, pad_to_even

__all__ = [
    "DEFAULT_PRESET", "DataConfig", "ModelConfig", "PRESETS", "RestoreConfig", "RestoreTask", "VARIANTS", "VARIANT_KEY",
    "ablation_columns", "ablation_metric", "image_metrics", "load_config", "load_model", "main",
    "model_name", "noise_gain_table", "plot_restorations", "run",
]

REGISTRY_TASK = "restoration"  # the registry task of this recipe's models (their metadata ``size`` is the task)


def available_variants() -> tuple[str, ...]:
    """Every registered restoration variant (registry metadata ``variant``: uglr, ugtv, transformer, bicubic, ...)."""
    return tuple(model_variants(REGISTRY_TASK))


VARIANTS = available_variants()
VARIANT_KEY = "model.variant"
TASKS = ("demosaic", "sr2")
METRIC_CHANNELS = ("rgb", "y")
# summary key -> column header of the ablation table (comparison.md / .csv); the noise columns are per preset σ
ablation_columns = {"params": "params", "psnr": "PSNR dB", "ssim": "SSIM", "s_per_mp": "s/MP",
                    "psnr_sigma5": "PSNR σ5", "psnr_sigma10": "PSNR σ10", "psnr_sigma15": "PSNR σ15",
                    "psnr_sigma25": "PSNR σ25", "psnr_drop_sigma25": "drop σ25", "steps": "steps", "wall_s": "wall s"}
ablation_metric = "psnr"


DEFAULT_PRESET = "demosaic_quick"  # what the recipe and `unrollattn ablate` run without --preset


def model_name(task: str, variant: str) -> str:
    """Registered model name of ``variant`` for ``task`` ("demosaic" | "sr2"), from the registry's metadata."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    try:
        return resolve_variant(REGISTRY_TASK, variant, task, size_label="task")
    except UnknownNameError as err:
        raise ValueError(f"variant: {err}") from None


def is_learned(variant: str, task: str) -> bool:
    """Whether the model has parameters to train (registry metadata ``learned``)."""
    return bool(MODELS.meta(model_name(task, variant)).get("learned"))


@dataclasses.dataclass
class ModelConfig:
    """``variant`` and its options (None = the model's default). Graph options apply to uglr/ugtv
    (see :class:`unrollattn.vision.restoration.GraphInterpolationNet`): ``iters`` = uGLR's CG steps per
    block, ``admm_iters`` = uGTV's ADMM iterations per block, ``cg_iters`` = uGTV's CG steps per ADMM
    x-step; ``fidelity`` (None: hard constraint Hx = y; a float: relaxed data term with learned weight
    initialised there). Swin options (embed_dim, depth, num_heads, window_size, mlp_ratio) apply to transformer."""

    variant: str = "uglr"
    blocks: int | None = None
    iters: int | None = None
    admm_iters: int | None = None
    cg_iters: int | None = None
    heads: int | None = None
    feature_dim: int | None = None
    width: int | None = None
    neighbourhood: str | None = None
    normalization: str | None = None
    metric: str | None = None
    step_sizes: str | None = None
    init: str | None = None
    skip_init: float | None = None
    colour_difference: bool | None = None
    green_smoothing: float | None = None
    fidelity: float | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    window_size: int | None = None
    mlp_ratio: float | None = None

    def __post_init__(self):
        if self.variant not in available_variants():
            raise ValueError(f"variant: expected one of {', '.join(available_variants())}, got {self.variant!r}")

    def options(self, task: str) -> dict[str, Any]:
        """Builder options of ``variant`` for ``task``: the set fields its registration declares (metadata
        ``config_options``: field -> option, e.g. uGTV's ``admm_iters`` -> ``iters``); other fields do not apply to it
        (one override list serves every variant of an ablation)."""
        declared = MODELS.meta(model_name(task, self.variant)).get("config_options", {})
        unknown = sorted(set(declared) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"model {model_name(task, self.variant)!r} declares config_options {unknown} that "
                             f"restore.ModelConfig has no field for")
        return {option: getattr(self, field) for field, option in declared.items() if getattr(self, field) is not None}


@dataclasses.dataclass
class DataConfig:
    """Photos, crops and evaluation (module doc). ``test_names`` empty = the fixed default test photos."""

    crop: int = 64
    augment: bool = True
    max_train: int | None = None
    test_names: tuple[str, ...] = ()
    eval_crop: int = 256
    border: int = 4
    metric_channels: str = "rgb"
    noise_sigmas: tuple[float, ...] = (5.0, 10.0, 15.0, 25.0)
    noise_seed: int = 1234
    figure_crop: int = 96

    def __post_init__(self):
        if self.crop < 8:
            raise ValueError(f"crop: expected >= 8, got {self.crop}")
        if self.border < 0 or self.eval_crop < 0:
            raise ValueError(f"border and eval_crop: expected >= 0, got {self.border}, {self.eval_crop}")
        if self.eval_crop and self.eval_crop <= 2 * self.border + 7:
            raise ValueError(f"eval_crop={self.eval_crop} leaves no room for SSIM after a border of {self.border}")
        if self.metric_channels not in METRIC_CHANNELS:
            raise ValueError(f"metric_channels: expected one of {', '.join(METRIC_CHANNELS)}, got {self.metric_channels!r}")
        if any(s < 0 for s in self.noise_sigmas):
            raise ValueError(f"noise_sigmas: expected values >= 0 (on the 0..255 scale), got {self.noise_sigmas}")


@dataclasses.dataclass
class RestoreConfig:
    """The whole run: task ("demosaic" | "sr2"), model, data, loop, optimizer, loss ("l1" | "mse")."""

    preset: str = "custom"
    task: str = "demosaic"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: str = "l1"

    def __post_init__(self):
        model_name(self.task, self.model.variant)  # validates task and the variant for it
        if self.loss not in ("l1", "mse"):
            raise ValueError(f"loss: expected 'l1' or 'mse', got {self.loss!r}")
        if self.task == "sr2" and self.data.crop % 2:
            raise ValueError(f"data.crop: the x2 grid needs an even crop, got {self.data.crop}")


# ----------------------------------------------------------------------------------------------- metrics


def image_metrics(output: torch.Tensor, target: torch.Tensor, border: int = 4, channels: str = "rgb"
                  ) -> tuple[float, float]:
    """(PSNR dB, SSIM) of one image [C, H, W] or [1, C, H, W] in [0, 1] by scikit-image.

    The output is clipped to [0, 1]; ``border`` pixels at each side are ignored; float64;
    ``data_range=1``; SSIM with skimage's defaults (7×7 uniform window) and ``channel_axis=-1``. ``channels="y"``
    scores the luma Y of ``skimage.color.rgb2ycbcr`` (BT.601, 16..235 of 255) divided by 255, as super-resolution
    papers do (RGB images only).
    """
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if channels not in METRIC_CHANNELS:
        raise ValueError(f"image_metrics: channels expected one of {', '.join(METRIC_CHANNELS)}, got {channels!r}")

    out, ref = (t[0] if t.ndim == 4 and t.shape[0] == 1 else t for t in (output, target))
    if out.shape != ref.shape or out.ndim != 3:
        raise ValueError(f"image_metrics: expected two images [C, H, W] of one shape, got {list(output.shape)} and "
                         f"{list(target.shape)}")
    if border:
        out, ref = out[:, border:-border, border:-border], ref[:, border:-border, border:-border]
    a = ref.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
    b = out.detach().to("cpu", torch.float64).clamp(0, 1).permute(1, 2, 0).numpy()
    if channels == "y":
        if a.shape[-1] != 3:
            raise ValueError(f"image_metrics: channels='y' needs RGB images, got {a.shape[-1]} channel(s)")
        a, b = rgb2ycbcr(a)[..., :1] / 255.0, rgb2ycbcr(b)[..., :1] / 255.0
    psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))
    ssim = float(structural_similarity(a, b, data_range=1.0, channel_axis=-1))
    return psnr, ssim


def _sigma_key(sigma: float) -> str:
    return f"{sigma:g}".replace(".", "p")


# ----------------------------------------------------------------------------------------------- task


def noise_generator(seed: int, image: int, sigma: float) -> torch.Generator:
    """The fixed noise of test image ``image`` at noise level ``sigma`` (the same for every variant and run)."""
    return torch.Generator().manual_seed(seed + 1009 * image + int(round(sigma * 100)))


class RestoreTask:
    """The :class:`unrollattn.train.Task` of demosaicking / ×2 interpolation (L1 or MSE on random crops)."""

    @property
    def loss_label(self) -> str:
        return "L1 error (per pixel, 0..1 scale)" if self.cfg.loss == "l1" else "squared error (per pixel, 0..1 scale)"

    def __init__(self, cfg: RestoreConfig, photos: PhotoDataset | None = None):
        self.cfg = cfg
        d = cfg.data
        self.photos = photos if photos is not None else load_photos(
            eval_crop=d.eval_crop, max_train=d.max_train, **({"test_names": d.test_names} if d.test_names else {}))
        self.name = model_name(cfg.task, cfg.model.variant)
        self._operator = None

    def build_model(self) -> nn.Module:
        model = unrollattn.build_model(self.name, **self.cfg.model.options(self.cfg.task))
        self._operator = model.forward_operator
        return model

    def heldout(self, count: int) -> dict[str, torch.Tensor]:
        """The first ``count`` test photos cropped to a common square (for the diagnostics): ``inputs`` (what the
        model sees: H x) and ``display`` (the photos)."""
        photos = [p.reshape(p.shape[-3:]) for p in self.photos.test_images()[:count]]  # [C, H, W] each
        crop = min(min(p.shape[-2:]) for p in photos)
        x = torch.stack([p[..., :crop, :crop] for p in photos]).float()
        return {"inputs": self.operator(x), "display": x}

    @property
    def operator(self):
        """The forward operator H, as the model owns it (restoration models own H): that of the model
        :meth:`build_model` built, or, before one was built, of a model built once to ask it (the global RNG kept)."""
        if self._operator is None:
            with torch.random.fork_rng(devices=[]):
                options = self.cfg.model.options(self.cfg.task)
                self._operator = unrollattn.build_model(self.name, **options).forward_operator
        return self._operator

    def batch(self, step: int, micro: int, state: DistState) -> dict[str, torch.Tensor]:
        loop = self.cfg.loop
        keep = micro_batch_slice(loop.batch_size, loop.grad_accum, state.world_size, micro, state.rank)
        gen = torch.Generator().manual_seed(global_batch_seed(loop.seed, step))
        x = self.photos.crops(loop.batch_size, self.cfg.data.crop, gen, augment=self.cfg.data.augment, keep=keep)
        return {"x": x, "y": self.operator(x)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch["y"]).float()
        err = out - batch["x"]
        loss = err.abs().mean() if self.cfg.loss == "l1" else err.square().mean()
        mse = float(err.detach().square().mean())
        return loss, {"train_psnr": -10 * math.log10(max(mse, 1e-12))}

    def observe(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(y, (H, W)): the samples of a test image x [1, C, H, W]. For ×2 an odd-sized photo is first
        reflect-padded to even sizes (``pad_to_even``); :meth:`restore` crops the output back to (H, W)."""
        size = tuple(x.shape[-2:])
        if self.cfg.task == "sr2" and (size[0] % 2 or size[1] % 2):
            x = pad_to_even(x)[0]
        return self.operator(x), size

    @staticmethod
    def restore(model: nn.Module, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return crop_to(model(y), size)

    def items_per_batch(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["x"].shape[0])

    def run_info(self) -> dict[str, Any]:
        """The variant, its registered model, the task and the photos of the run."""
        return {"variant": self.cfg.model.variant, "model": self.name, "task": self.cfg.task, "data": self.photos.name}

    def evaluate(self, model: nn.Module, state: DistState) -> dict[str, float]:
        """PSNR / SSIM / s per MP on clean samples and PSNR per noise σ, averaged over the test photos
        (sharded over ranks and all-reduced)."""
        d = self.cfg.data
        sigmas = list(d.noise_sigmas)
        images = self.photos.test_images()
        # sums: psnr, ssim, count, seconds, megapixels, then one psnr sum per sigma
        totals = torch.zeros(5 + len(sigmas), dtype=torch.float64)
        for i in range(state.rank, len(images), state.world_size):
            x = images[i].to(state.device)
            y, size = self.observe(x)
            if state.device.type == "cuda":
                torch.cuda.synchronize(state.device)
            t0 = time.perf_counter()
            out = self.restore(model, y, size)
            if state.device.type == "cuda":
                torch.cuda.synchronize(state.device)
            totals[3] += time.perf_counter() - t0
            totals[4] += x.shape[-1] * x.shape[-2] / 1e6
            psnr, ssim = image_metrics(out.float(), x, d.border, d.metric_channels)
            totals[0] += psnr
            totals[1] += ssim
            totals[2] += 1
            for j, sigma in enumerate(sigmas):
                gen = noise_generator(d.noise_seed, i, sigma)
                noise = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device, y.dtype)
                noisy = self.restore(model, y + sigma / 255.0 * noise, size)
                totals[5 + j] += image_metrics(noisy.float(), x, d.border, d.metric_channels)[0]
        totals = all_reduce_tensor(totals.to(state.device), state, "sum").cpu()
        count = max(float(totals[2]), 1.0)
        out = {"psnr": float(totals[0]) / count, "ssim": float(totals[1]) / count,
               "s_per_mp": float(totals[3] / totals[4]) if totals[4] > 0 else math.nan}
        for j, sigma in enumerate(sigmas):
            noisy = float(totals[5 + j]) / count
            out[f"psnr_sigma{_sigma_key(sigma)}"] = noisy
            out[f"psnr_drop_sigma{_sigma_key(sigma)}"] = out["psnr"] - noisy
        return out

    @torch.no_grad()
    def noise_gain(self, model: nn.Module, sigma: float = 25.0) -> dict[str, float]:
        """Where the noise-shift loss comes from, on the test photos (noise seeded as in :meth:`evaluate`):
        ``gain_observed`` / ``gain_unobserved`` = mean (out(y + n) − out(y))² / σ² over the observed / the
        interpolated entries (1.0 on the samples for any model that copies them), and the noisy MSE split into
        ``mse_observed`` + ``mse_unobserved`` (shares of the total, summed over entries / all entries)."""
        sums = torch.zeros(4, dtype=torch.float64)
        count = 0
        images = self.photos.test_images()
        for i, x in enumerate(images):
            y, size = self.observe(x)
            gen = noise_generator(self.cfg.data.noise_seed, i, sigma)
            noisy_y = y + sigma / 255.0 * torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.dtype)
            clean = self.restore(model, y, size).double()
            noisy = self.restore(model, noisy_y, size).double()
            mask = self.operator.observed_mask(*size).expand_as(clean)
            diff, err = (noisy - clean).square(), (noisy.clamp(0, 1) - x.double()).square()
            sums += torch.stack([diff[mask].mean(), diff[~mask].mean(), err[mask].sum() / err.numel(),
                                 err[~mask].sum() / err.numel()]).cpu()
            count += 1
        s = sums / max(count, 1)
        var = (sigma / 255.0) ** 2
        return {"gain_observed": float(s[0] / var), "gain_unobserved": float(s[1] / var),
                "mse_observed": float(s[2]), "mse_unobserved": float(s[3])}

    def export(self, model: nn.Module, run_dir: Path) -> None:
        """Write ``restoration_samples.npz`` (figure crop) and refresh the figure of the runs in ``loop.out_dir``."""
        images = self.photos.test_images()
        if not images:
            return
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        x = images[0].to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            y, size = self.observe(x)
            out = self.restore(model, y, size).float().clamp(0, 1)
        model.train(was_training)
        c = min(self.cfg.data.figure_crop, x.shape[-1], x.shape[-2])
        top, left = (x.shape[-2] - c) // 2, (x.shape[-1] - c) // 2
        crop = lambda t: t[0, :, top:top + c, left:left + c].detach().cpu().permute(1, 2, 0).numpy()  # noqa: E731
        observed = crop_to(self.operator.adjoint(y) if self.cfg.task == "demosaic" else
                           F.interpolate(y, scale_factor=2, mode="nearest"), size)
        psnr = image_metrics(out, x, self.cfg.data.border, self.cfg.data.metric_channels)[0]
        samples = dict(target=crop(x), output=crop(out), observed=crop(observed.float()), psnr=psnr,
                       label=self.cfg.model.variant, photo=self.photos.test_names[0], task=self.cfg.task,
                       preset=self.cfg.preset, params=count_params(model))
        with atomic_path(Path(run_dir) / "restoration_samples.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **samples)  # a file object: np.savez would append .npz to the temporary name
        try:
            plot_restorations(Path(run_dir).parent, task=self.cfg.task, preset=self.cfg.preset)
        except Exception as err:  # a plotting problem must not lose a finished run
            print(f"warning: could not plot restorations: {err}", file=sys.stderr)


def plot_restorations(out_dir: str | os.PathLike, *, task: str, preset: str) -> Path | None:
    """``out_dir/restorations_<task>_<preset>.png``: ground truth, input and each run's output crop
    (every ``out_dir/*/restoration_samples.npz`` of that task and preset), written atomically."""
    out_dir = Path(out_dir)
    samples = []
    for path in sorted(out_dir.glob("*/restoration_samples.npz")):
        with np.load(path) as z:
            if str(z["task"]) == task and str(z["preset"]) == preset:
                samples.append((path.parent.name, {k: z[k] for k in z.files}))
    if not samples:
        return None
    first = samples[0][1]
    panels = [("ground truth", first["target"]), ("input (" + ("mosaic" if task == "demosaic" else "x2 grid") + ")",
                                                   first["observed"])]
    panels += [((f"{run}\n" if run != str(s["label"]) else "") +
                f"{str(s['label'])}: {float(s['psnr']):.2f} dB, {int(s['params']):,} params", s["output"])
               for run, s in samples]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = new_figure(rows, cols, figsize=(3.2 * cols, 3.6 * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, image) in zip(axes.flat, panels):
        ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{task} / {preset}: centre crop of {str(first['photo'])} (PSNR over this photo's whole test crop)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=1.5)
    return save_figure(fig, out_dir / f"restorations_{task}_{preset}.png", dpi=100)


# ----------------------------------------------------------------------------------------------- presets

PRESETS = Registry("restore preset")


def _quick(task: str, preset: str) -> RestoreConfig:
    return RestoreConfig(
        preset=preset, task=task,
        model=ModelConfig(variant="uglr", blocks=3, heads=2, iters=4, admm_iters=2, cg_iters=2, feature_dim=6, width=16),
        data=DataConfig(crop=48, eval_crop=128, border=4),
        loop=LoopConfig(max_steps=300, batch_size=4, eval_every=0, log_every=25, ckpt_every=0),
        optim=OptimConfig(lr=2e-3, weight_decay=0.0, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1,
                          grad_clip=1.0),
    )


def _full(task: str, preset: str) -> RestoreConfig:
    field_metrics = dict(border=0, metric_channels="rgb") if task == "demosaic" else dict(border=2, metric_channels="y")
    return RestoreConfig(
        preset=preset, task=task,
        model=ModelConfig(variant="uglr", blocks=4, heads=4, feature_dim=6, width=16),
        data=DataConfig(crop=64, eval_crop=256, **field_metrics),
        loop=LoopConfig(max_steps=4000, batch_size=16, eval_every=1000, log_every=50, ckpt_every=500),
        optim=OptimConfig(lr=2e-3, weight_decay=0.0, warmup_steps=100, schedule="cosine", min_lr_ratio=0.05,
                          grad_clip=1.0),
    )


@PRESETS.register("demosaic_quick")
def demosaic_quick() -> RestoreConfig:
    """CPU (1-2 threads), minutes per variant: 300 AdamW steps of 4 crops 48x48 (lr 2e-3, 30 warm-up steps,
    cosine); uGLR/uGTV with 3 blocks, 2 heads (uGLR 4 CG steps, uGTV 2 ADMM x 2 CG steps); Swin 0.3M;
    evaluation on centre 128x128 crops of the 8 test photos."""
    return _quick("demosaic", "demosaic_quick")


@PRESETS.register("sr2_quick")
def sr2_quick() -> RestoreConfig:
    """As demosaic_quick for x2 interpolation."""
    return _quick("sr2", "sr2_quick")


@PRESETS.register("demosaic")
def demosaic() -> RestoreConfig:
    """Longer (GPU, or hours on CPU): 4000 steps of 16 crops 64x64, uGLR/uGTV with 4 blocks x 4 heads,
    evaluation on centre 256x256 crops as the field scores demosaicking: RGB PSNR/SSIM, no border shaved."""
    return _full("demosaic", "demosaic")


@PRESETS.register("sr2")
def sr2() -> RestoreConfig:
    """As demosaic for x2 interpolation, scored as super-resolution papers do: PSNR/SSIM of the luma Y (BT.601)
    inside a border of 2 pixels (the scale factor)."""
    return _full("sr2", "sr2")


@PRESETS.register("tiny")
def tiny() -> RestoreConfig:
    """Seconds (tests, smoke runs): 6 steps of 2 crops 24x24 from 2 train photos, 1 block, 2 test photos
    (astronaut, chelsea) centre-cropped to 32x32, one noise level."""
    return RestoreConfig(
        preset="tiny", task="demosaic",
        model=ModelConfig(variant="uglr", blocks=1, heads=2, iters=2, admm_iters=1, cg_iters=1, feature_dim=4, width=8,
                          embed_dim=24, depth=2, num_heads=2, window_size=4),
        data=DataConfig(crop=24, eval_crop=32, border=2, max_train=2, test_names=("astronaut", "chelsea"),
                        noise_sigmas=(10.0,), figure_crop=24),
        loop=LoopConfig(max_steps=6, batch_size=2, eval_every=0, log_every=2, ckpt_every=0, progress=False),
        optim=OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=1.0),
    )


# ----------------------------------------------------------------------------------------------- entry points


def load_config(preset: str = DEFAULT_PRESET, overrides: Sequence[str] | None = None, *,
                resume: bool = False) -> RestoreConfig:
    """Preset ``preset`` with ``key=value`` overrides applied (``resume`` sets ``loop.resume``)."""
    cfg = apply_overrides(PRESETS.get(preset)(), list(overrides or []))
    return apply_overrides(cfg, ["loop.resume=true"]) if resume else cfg


def run(cfg: RestoreConfig) -> dict[str, Any]:
    """Train ``cfg`` with ``fit``, or, for a variant without parameters, evaluate it there with ``loop.max_steps=0``;
    return fit's summary (also result.json) with ``variant``, ``model``, ``task`` and ``data``."""
    if not is_learned(cfg.model.variant, cfg.task):
        cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, max_steps=0))
    return fit(RestoreTask(cfg), cfg.loop, cfg.optim, run_name_prefix=f"restore-{cfg.preset}-{cfg.model.variant}",
               config_for_log=cfg)


def make_task(cfg: RestoreConfig) -> RestoreTask:
    """The task of ``cfg`` (it loads the photos): what the diagnostics ask for held-out examples."""
    return RestoreTask(cfg)


def load_model(run_dir: str | Path) -> tuple[nn.Module, RestoreConfig]:
    """The model of a finished run directory (trained weights from its latest checkpoint), in eval mode."""
    cfg = read_run_config(run_dir, RestoreConfig, "restore")
    model = unrollattn.build_model(model_name(cfg.task, cfg.model.variant), **cfg.model.options(cfg.task))
    if is_learned(cfg.model.variant, cfg.task):
        load_latest_weights(run_dir, model)
    return model.eval(), cfg


def noise_gain_table(run_dirs: Sequence[str | Path], sigma: float = 25.0) -> str:
    """Markdown table of :meth:`RestoreTask.noise_gain` for finished run directories."""
    heading = (f"Noise σ = {sigma:g}/255 on the samples, test photos; gain = mean (out(y+n) − out(y))² / σ²; noisy MSE "
               f"= the squared error summed over those entries / all entries.")
    headers = {"run": "run", "params": "params", "gain_observed": "noise gain on samples",
               "gain_unobserved": "noise gain interpolated", "mse_observed": "noisy MSE on samples",
               "mse_unobserved": "noisy MSE interpolated"}
    rows = []
    for run_dir in run_dirs:
        model, cfg = load_model(run_dir)
        rows.append({"run": Path(run_dir).name, "params": count_params(model),
                     **RestoreTask(cfg).noise_gain(model, sigma)})
    return heading + "\n\n" + markdown_table(rows, list(headers), headers=headers)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``[--preset NAME] [--resume] [key=value ...]``; prints the summary as JSON.
    ``noise-gain RUN_DIR [RUN_DIR ...]`` prints :func:`noise_gain_table` (σ = 25) instead of training."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["noise-gain"]:
        if len(argv) < 2:
            raise ValueError("noise-gain: expected one or more restore run directories, e.g. "
                             "python -m unrollattn.recipes.restore noise-gain runs/ablate-restore-demosaic_quick/uglr")
        print(noise_gain_table(argv[1:]))
        return 0
    return recipe_main(argv, prog="python -m unrollattn.recipes.restore", description=__doc__.split("\n\n")[0], presets=PRESETS,
                       default_preset=DEFAULT_PRESET, load_config=load_config, run=run)


if __name__ == "__main__":
    from unrollattn.utils.errors import exit_on_error

    sys.exit(exit_on_error(main))
