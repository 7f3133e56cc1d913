"""FGSM / PGD stay in the eps-ball and raise the loss; word contamination swaps the requested fraction."""
import pytest
import torch
import torch.nn.functional as F

from unrollattn.diagnostics.robustness import adversarial_accuracy, contaminate_words, fgsm, pgd


def _linear_classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).double()


def test_fgsm_is_eps_times_gradient_sign_for_a_linear_model():
    model = _linear_classifier()
    x, y = torch.rand(6, 3, 4, 4, dtype=torch.float64) * 0.5 + 0.25, torch.randint(0, 5, (6,))
    eps = 0.05
    adv = fgsm(model, x, y, eps)
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(model(xg), y).backward()
    torch.testing.assert_close(adv, x + eps * xg.grad.sign())
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_pgd_stays_in_the_ball_and_beats_fgsm_or_ties():
    model = _linear_classifier()
    x, y = torch.rand(32, 3, 4, 4, dtype=torch.float64), torch.randint(0, 5, (32,))
    eps = 8 / 255
    adv = pgd(model, x, y, eps, steps=10, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-12 and adv.min() >= 0 and adv.max() <= 1
    assert F.cross_entropy(model(adv), y) >= F.cross_entropy(model(fgsm(model, x, y, eps)), y) - 1e-6


def test_adversarial_accuracy_drops_with_eps_and_restores_mode():
    model = _linear_classifier().train()
    x = torch.rand(64, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(-1)  # the model is right on every clean image
    acc = adversarial_accuracy(model, x, y, [0.0, 0.05, 0.2], attack="pgd", steps=5)
    assert acc["clean"] == 100.0 and acc["pgd@0.0000"] == 100.0
    assert acc["pgd@0.2000"] <= acc["pgd@0.0500"] < 100.0
    assert model.training
    with pytest.raises(ValueError, match="attack"):
        adversarial_accuracy(model, x, y, [0.1], attack="cw")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        fgsm(model, x.flatten(1), y, 0.1)


def test_contaminate_words_swaps_the_requested_fraction_of_eligible_tokens():
    ids = torch.arange(1000).view(10, 100)
    protected = ids % 10 == 0
    out = contaminate_words(ids, 0.015, junk_id=-1, protected=protected, generator=torch.Generator().manual_seed(0))
    swapped = out == -1
    assert swapped.sum() == round(0.015 * 900) and not (swapped & protected).any()
    assert torch.equal(out[~swapped], ids[~swapped])
    with pytest.raises(ValueError, match="rate"):
        contaminate_words(ids, 1.5, junk_id=0)
