"""Robustness probes: FGSM / PGD adversarial accuracy for image classifiers (docs/papers.md C.7; word-level data
contamination for language models is :mod:`unrollattn.language.evaluation`).

Attacks work in pixel space [0, 1] with an L-infinity budget eps in [0, 1] (e.g. 4/255 = 0.0157);
``preprocess`` maps pixels to the model's input (e.g. mean/std normalisation) and runs inside the
attacked function, so the budget means the same for every model and the gradient flows through it.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..utils.dist import is_main_process

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


def _progress_printer(progress: bool | Callable[[str], None] | None) -> Callable[[str], None] | None:
    """``progress`` as a line printer: a callable as given; True prints; None prints on the main process only (the
    ``RANK`` of torchrun unset or 0); False is silent."""
    if callable(progress):
        return progress
    if progress is None:
        progress = is_main_process()
    return (lambda line: print(line, flush=True)) if progress else None


def adversarial_counts(model, images: torch.Tensor, labels: torch.Tensor, eps_values: Sequence[float], *,
                       attacks: str | Sequence[str] = ATTACKS, batch_size: int = 256, preprocess: Callable = _identity,
                       seed: int = 0, steps: int = 10, step_size: float | None = None,
                       random_start: bool = True, progress: bool | Callable[[str], None] | None = None) -> dict[str, int]:
    """Correctly classified images, clean and under each attack at each eps:
    ``{"count": n, "clean": c, "fgsm@2/255": ..., "pgd@2/255": ...}`` (integers, so ranks can sum them).

    ``model`` is put in eval mode for the attack and restored afterwards; PGD's random starts come
    from a generator seeded with ``seed``, so a call is deterministic. ``progress`` prints one line per attack and
    budget as it completes (accuracy on these images, seconds): None (default) on the main process only, True /
    False always / never, or a callable that receives each line.
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
    say = _progress_printer(progress)
    batches = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), int(batch_size))]
    n = int(labels.numel())
    # The attacks run one (attack, eps) at a time over all batches, so that each can report when it is done. PGD's
    # random starts are drawn from one generator in batch-major order (batch, then eps), as when the batches came
    # first: record the generator state before each draw, so the numbers do not depend on the loop order.
    generator = torch.Generator().manual_seed(seed)
    starts = {}
    if "pgd" in attacks and random_start:
        for b, (x, _) in enumerate(batches):
            for e, eps in enumerate(eps_values):
                if eps > 0:  # pgd draws no start for a zero budget
                    starts[b, e] = generator.get_state()
                    torch.rand(x.shape, generator=generator, dtype=x.dtype)
    counts = {"count": n, "clean": 0, **{f"{a}@{name}": 0 for a in attacks for name in labels_of}}
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        counts["clean"] = sum(_correct(model, x, y, preprocess) for x, y in batches)
        if say is not None:
            say(f"robustness: clean {_percent(counts['clean'], n)} ({n} images, {time.perf_counter() - t0:.1f} s)")
        for attack in attacks:
            for e, (eps, name) in enumerate(zip(eps_values, labels_of)):
                t0, key = time.perf_counter(), f"{attack}@{name}"
                for b, (x, y) in enumerate(batches):
                    if attack == "fgsm":
                        adv = fgsm(model, x, y, eps, preprocess=preprocess)
                    else:
                        start = torch.Generator().set_state(starts[b, e]) if (b, e) in starts else None
                        adv = pgd(model, x, y, eps, steps=steps, step_size=step_size, random_start=random_start,
                                  generator=start, preprocess=preprocess)
                    counts[key] += _correct(model, adv, y, preprocess)
                if say is not None:
                    say(f"robustness: {key} {_percent(counts[key], n)} ({n} images, {time.perf_counter() - t0:.1f} s)")
    finally:
        model.train(was_training)
    return counts


def _percent(correct: int, n: int) -> str:
    return f"top1 {100.0 * correct / max(1, n):.1f}%"


def adversarial_accuracy(model, images: torch.Tensor, labels: torch.Tensor, eps_values: Sequence[float], *,
                         attack: str | Sequence[str] = "pgd", **options) -> dict[str, float]:
    """Top-1 (%) on clean images and under ``attack`` (a name or several) at each eps:
    ``{"clean": ..., "pgd@4/255": ...}``. Options as :func:`adversarial_counts`."""
    counts = adversarial_counts(model, images, labels, eps_values, attacks=attack, **options)
    n = counts.pop("count")
    return {k: 100.0 * v / max(1, n) for k, v in counts.items()}


__all__ = ["ATTACKS", "adversarial_accuracy", "adversarial_counts", "check_eps", "eps_label",
           "fgsm", "pgd"]
