"""FGSM / PGD stay in the eps-ball and raise the loss; word contamination swaps the requested fraction."""
import math

import pytest
import torch
import torch.nn.functional as F

from unrollattn.diagnostics.robustness import adversarial_accuracy, adversarial_counts, check_eps, eps_label, fgsm, pgd
from unrollattn.language.evaluation import contaminate_words


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
    assert acc["clean"] == 100.0 and acc["pgd@0/255"] == 100.0
    assert acc["pgd@51/255"] <= acc["pgd@0.05"] < 100.0  # 0.2 = 51/255
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


def _trained_digits_mlp():
    """A small MLP trained for a few hundred full-batch steps on scikit-learn digits (pixels in [0, 1])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]  # [N, 1, 8, 8]
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mean, std = 0.3, 0.4
    preprocess = lambda t: (t - mean) / std  # noqa: E731  the model sees normalised inputs
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(preprocess(x[:1400])), y[:1400]).backward()
        opt.step()
    return model, x[1400:], y[1400:], preprocess


def test_attacks_lower_the_accuracy_of_a_trained_model_and_eps_zero_is_clean():
    model, x, y, preprocess = _trained_digits_mlp()
    acc = adversarial_accuracy(model, x, y, [0.0, 8 / 255, 32 / 255], attack=("fgsm", "pgd"), preprocess=preprocess,
                               steps=5, batch_size=150)
    assert acc["clean"] > 85
    assert acc["fgsm@0/255"] == acc["pgd@0/255"] == acc["clean"]
    for attack in ("fgsm", "pgd"):
        assert acc[f"{attack}@32/255"] < acc[f"{attack}@8/255"] < acc["clean"]
    assert acc["pgd@32/255"] <= acc["fgsm@32/255"]


def test_preprocess_is_inside_the_attacked_function():
    """Attacking pixels through ``preprocess`` = attacking the composed model (normalisation + network)."""
    model, x, y, preprocess = _trained_digits_mlp()
    composed = torch.nn.Sequential(_Lambda(preprocess), model)
    torch.testing.assert_close(fgsm(model, x, y, 4 / 255, preprocess=preprocess), fgsm(composed, x, y, 4 / 255))
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    torch.testing.assert_close(pgd(model, x, y, 4 / 255, steps=3, generator=gen(), preprocess=preprocess),
                               pgd(composed, x, y, 4 / 255, steps=3, generator=gen()))


class _Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_counts_of_shards_sum_to_the_counts_of_the_whole():
    model, x, y, preprocess = _trained_digits_mlp()
    whole = adversarial_counts(model, x, y, [4 / 255], attacks="fgsm", preprocess=preprocess, batch_size=64)
    halves = [adversarial_counts(model, x[r::2], y[r::2], [4 / 255], attacks="fgsm", preprocess=preprocess)
              for r in (0, 1)]
    assert whole == {k: halves[0][k] + halves[1][k] for k in whole}
    assert whole["count"] == len(y) and set(whole) == {"count", "clean", "fgsm@4/255"}


def test_eps_labels_and_bad_input():
    assert (eps_label(2 / 255), eps_label(0.0), eps_label(0.01), check_eps(1)) == ("2/255", "0/255", "0.01", 1.0)
    model = _linear_classifier()
    x, y = torch.rand(4, 3, 4, 4, dtype=torch.float64), torch.randint(0, 5, (4,))
    for bad in (-0.01, 2.0, math.nan, math.inf, "big"):
        with pytest.raises(ValueError, match=r"eps: expected a number in \[0, 1\] \(pixel units"):
            fgsm(model, x, y, bad)
        with pytest.raises(ValueError, match="eps"):
            pgd(model, x, y, bad)
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        pgd(model, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="distinct budgets"):
        adversarial_counts(model, x, y, [2 / 255, 2 / 255])
    with pytest.raises(ValueError, match="attack: expected distinct names"):
        adversarial_counts(model, x, y, [0.1], attacks=("fgsm", "fgsm"))
    with pytest.raises(ValueError, match=r"labels: expected shape \[4\]"):
        fgsm(model, x, y[:2], 0.1)
