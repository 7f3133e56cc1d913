"""Robustness probes: FGSM / PGD adversarial accuracy for image classifiers and word-level data
contamination for language models (docs/papers.md C.7).

Attacks work in pixel space [0, 1] with an L-infinity budget eps in [0, 1] (e.g. 4/255 = 0.0157);
``preprocess`` maps pixels to the model's input (e.g. mean/std normalisation) and runs inside the
attacked function, so the budget means the same for every model and the gradient flows through it.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ATTACKS = ("fgsm", "pgd")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def check_eps(eps: float) -> float:
    """``eps`` as a float, or ValueError unless it is a finite budget in [0, 1] (pixel units, before normalisation)."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps: expected a number in [0, 1] (pixel units, e.g. 2/255 = 0.0078), got {eps!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"eps: expected a number in [0, 1] (pixel units, e.g. 2/255 = 0.0078), got {eps!r}")
    return value


def eps_label(eps: float) -> str:
    """Short name of a budget: ``2/255`` when eps is a whole number of 8-bit levels, else ``0.01``."""
    levels = check_eps(eps) * 255
    return f"{round(levels)}/255" if abs(levels - round(levels)) < 1e-6 else f"{eps:g}"


def _loss_grad(model, images, labels, preprocess):
    with torch.enable_grad():
        images = images.detach().requires_grad_(True)
        loss = F.cross_entropy(model(preprocess(images)).float(), labels)
        (grad,) = torch.autograd.grad(loss, images)
    return grad


def _check(images: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    if images.ndim != 4:
        raise ValueError(f"images: expected [B, C, H, W] pixels in [0, 1], got shape {list(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels: expected shape [{images.shape[0]}], got {list(labels.shape)}")
    return check_eps(eps)


def fgsm(model, images, labels, eps: float, *, preprocess: Callable = _identity) -> torch.Tensor:
    """x + eps * sign(grad_x loss), clipped to [0, 1] (Goodfellow et al., 2015)."""
    eps = _check(images, labels, eps)
    if eps == 0:
        return images.detach().clone()
    return (images + eps * _loss_grad(model, images, labels, preprocess).sign()).clamp(0, 1).detach()


def pgd(model, images, labels, eps: float, *, steps: int = 10, step_size: float | None = None,
        random_start: bool = True, generator: torch.Generator | None = None,
        preprocess: Callable = _identity) -> torch.Tensor:
    """Projected gradient ascent on the loss inside the L-inf ball of radius eps (Madry et al., 2018);
    ``step_size`` defaults to 2.5 eps / steps, the start is uniform in the ball (``random_start``)."""
    eps = _check(images, labels, eps)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    step_size = 2.5 * eps / steps if step_size is None else float(step_size)
    if not math.isfinite(step_size) or step_size < 0:
        raise ValueError(f"step_size: expected a finite number >= 0, got {step_size!r}")
    if eps == 0:
        return images.detach().clone()
    adv = images.detach().clone()
    if random_start:
        noise = torch.rand(images.shape, generator=generator, dtype=images.dtype).to(images.device)
        adv = (images + (2 * noise - 1) * eps).clamp(0, 1)
    for _ in range(int(steps)):
        adv = adv + step_size * _loss_grad(model, adv, labels, preprocess).sign()
        adv = torch.min(torch.max(adv, images - eps), images + eps).clamp(0, 1).detach()
    return adv


@torch.no_grad()
def _correct(model, images, labels, preprocess) -> int:
    return int((model(preprocess(images)).argmax(-1) == labels).sum())


def _check_attacks(attacks: str | Sequence[str]) -> tuple[str, ...]:
    attacks = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or len(set(attacks)) != len(attacks):
        raise ValueError(f"attack: expected distinct names from {ATTACKS}, got {list(attacks)!r}")
    return attacks


def adversarial_counts(model, images: torch.Tensor, labels: torch.Tensor, eps_values: Sequence[float], *,
                       attacks: str | Sequence[str] = ATTACKS, batch_size: int = 256, preprocess: Callable = _identity,
                       seed: int = 0, steps: int = 10, step_size: float | None = None,
                       random_start: bool = True) -> dict[str, int]:
    """Correctly classified images, clean and under each attack at each eps:
    ``{"count": n, "clean": c, "fgsm@2/255": ..., "pgd@2/255": ...}`` (integers, so ranks can sum them).

    ``model`` is put in eval mode for the attack and restored afterwards; PGD's random starts come
    from a generator seeded with ``seed``, so a call is deterministic.
    """
    attacks = _check_attacks(attacks)
    eps_values = [check_eps(e) for e in eps_values]
    labels_of = [eps_label(e) for e in eps_values]
    if len(set(labels_of)) != len(labels_of):
        raise ValueError(f"eps: expected distinct budgets, got {list(eps_values)}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected images [B, C, H, W] and labels [B], got {list(images.shape)} and {list(labels.shape)}")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    counts = {"count": int(labels.numel()), "clean": 0, **{f"{a}@{n}": 0 for a in attacks for n in labels_of}}
    try:
        for start in range(0, len(images), int(batch_size)):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            counts["clean"] += _correct(model, x, y, preprocess)
            for attack in attacks:
                for eps, name in zip(eps_values, labels_of):
                    adv = (fgsm(model, x, y, eps, preprocess=preprocess) if attack == "fgsm" else
                           pgd(model, x, y, eps, steps=steps, step_size=step_size, random_start=random_start,
                               generator=generator, preprocess=preprocess))
                    counts[f"{attack}@{name}"] += _correct(model, adv, y, preprocess)
    finally:
        model.train(was_training)
    return counts


def adversarial_accuracy(model, images: torch.Tensor, labels: torch.Tensor, eps_values: Sequence[float], *,
                         attack: str | Sequence[str] = "pgd", **options) -> dict[str, float]:
    """Top-1 (%) on clean images and under ``attack`` (a name or several) at each eps:
    ``{"clean": ..., "pgd@4/255": ...}``. Options as :func:`adversarial_counts`."""
    counts = adversarial_counts(model, images, labels, eps_values, attacks=attack, **options)
    n = counts.pop("count")
    return {k: 100.0 * v / max(1, n) for k, v in counts.items()}


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


__all__ = ["ATTACKS", "adversarial_accuracy", "adversarial_counts", "check_eps", "contaminate_words", "eps_label",
           "fgsm", "pgd"]
