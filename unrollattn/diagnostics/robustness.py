"""Robustness probes: FGSM / PGD adversarial accuracy for image classifiers and word-level data
contamination for language models (docs/papers.md C.7).

Attacks work in pixel space [0, 1] with an L-infinity budget eps (e.g. 4/255); ``preprocess`` maps
pixels to the model's input (normalisation), so the budget means the same for every model.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _loss_grad(model, images, labels, preprocess):
    images = images.detach().requires_grad_(True)
    loss = F.cross_entropy(model(preprocess(images)), labels)
    (grad,) = torch.autograd.grad(loss, images)
    return grad


def _check(images: torch.Tensor, labels: torch.Tensor, eps: float) -> None:
    if images.ndim != 4:
        raise ValueError(f"images: expected [B, C, H, W] pixels in [0, 1], got shape {list(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels: expected shape [{images.shape[0]}], got {list(labels.shape)}")
    if eps < 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")


def fgsm(model, images, labels, eps: float, *, preprocess: Callable = lambda t: t) -> torch.Tensor:
    """x + eps * sign(grad_x loss), clipped to [0, 1] (Goodfellow et al., 2015)."""
    _check(images, labels, eps)
    return (images + eps * _loss_grad(model, images, labels, preprocess).sign()).clamp(0, 1).detach()


def pgd(model, images, labels, eps: float, *, steps: int = 10, step_size: float | None = None,
        random_start: bool = True, generator: torch.Generator | None = None,
        preprocess: Callable = lambda t: t) -> torch.Tensor:
    """Projected gradient ascent on the loss inside the L-inf ball of radius eps (Madry et al., 2018)."""
    _check(images, labels, eps)
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    adv = images.clone()
    if random_start and eps > 0:
        noise = torch.rand(images.shape, generator=generator, dtype=images.dtype).to(images.device)
        adv = (images + (2 * noise - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv = adv + step_size * _loss_grad(model, adv, labels, preprocess).sign()
        adv = torch.min(torch.max(adv, images - eps), images + eps).clamp(0, 1).detach()
    return adv


@torch.no_grad()
def _correct(model, images, labels, preprocess) -> int:
    return int((model(preprocess(images)).argmax(-1) == labels).sum())


def adversarial_accuracy(model, images: torch.Tensor, labels: torch.Tensor, eps_values, *, attack: str = "pgd",
                         batch_size: int = 256, preprocess: Callable = lambda t: t, seed: int = 0, **attack_options) -> dict:
    """Top-1 (%) on clean images and under ``attack`` at each eps: {"clean": ..., "pgd@0.0157": ...}."""
    if attack not in ("fgsm", "pgd"):
        raise ValueError(f"attack: expected 'fgsm' or 'pgd', got {attack!r}")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    counts = {"clean": 0, **{f"{attack}@{eps:.4f}": 0 for eps in eps_values}}
    try:
        for start in range(0, len(images), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            counts["clean"] += _correct(model, x, y, preprocess)
            for eps in eps_values:
                adv = (fgsm(model, x, y, eps, preprocess=preprocess) if attack == "fgsm" else
                       pgd(model, x, y, eps, generator=generator, preprocess=preprocess, **attack_options))
                counts[f"{attack}@{eps:.4f}"] += _correct(model, adv, y, preprocess)
    finally:
        model.train(was_training)
    return {k: 100.0 * v / max(1, len(images)) for k, v in counts.items()}


def contaminate_words(ids: torch.Tensor, rate: float, junk_id: int, *, word_start: torch.Tensor | None = None,
                      protected: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace a fraction ``rate`` of the eligible tokens of ``ids`` by ``junk_id`` (the 1.5% word-swap test).

    ``word_start``: bool mask of tokens that begin a word (only those are swapped; default every token);
    ``protected``: bool mask of tokens never swapped (e.g. stop words). Returns a new tensor.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate: expected a fraction in [0, 1], got {rate}")
    eligible = torch.ones_like(ids, dtype=torch.bool) if word_start is None else word_start.clone()
    if protected is not None:
        eligible &= ~protected
    positions = eligible.flatten().nonzero().flatten()
    count = int(round(rate * positions.numel()))
    chosen = positions[torch.randperm(positions.numel(), generator=generator)[:count]]
    out = ids.clone().flatten()
    out[chosen] = junk_id
    return out.view_as(ids)


__all__ = ["adversarial_accuracy", "contaminate_words", "fgsm", "pgd"]
