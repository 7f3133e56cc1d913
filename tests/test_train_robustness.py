"""Progress of the post-training adversarial evaluation (one line per attack and budget) without changing a number."""
import torch

from unrollattn.diagnostics.robustness import _correct, adversarial_counts, eps_label, fgsm, pgd


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).double()


def _batch_major_counts(model, x, y, eps_values, batch_size, seed, steps):
    """The order the attacks always ran in (batches outer, attack and eps inner), as the reference."""
    generator = torch.Generator().manual_seed(seed)
    counts = {"count": len(y), "clean": 0}
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        counts["clean"] += _correct(model, xb, yb, lambda t: t)
        for attack in ("fgsm", "pgd"):
            for eps in eps_values:
                adv = fgsm(model, xb, yb, eps) if attack == "fgsm" else pgd(model, xb, yb, eps, steps=steps,
                                                                            generator=generator)
                key = f"{attack}@{eps_label(eps)}"
                counts[key] = counts.get(key, 0) + _correct(model, adv, yb, lambda t: t)
    return counts


def test_one_progress_line_per_attack_and_budget_and_the_same_counts():
    model = _model().eval()
    x = torch.rand(40, 3, 4, 4, dtype=torch.float64)
    y = model(x).argmax(-1)  # all correct when clean, so that the attacks' (and the random starts') effect shows
    eps_values = [0.0, 4 / 255, 0.1]
    lines = []
    counts = adversarial_counts(model, x, y, eps_values, batch_size=16, seed=3, steps=3, progress=lines.append)
    assert counts == _batch_major_counts(model, x, y, eps_values, batch_size=16, seed=3, steps=3)
    assert counts["clean"] == 40 and 0 < counts["pgd@4/255"] < 40
    assert [line.split()[1] for line in lines] == ["clean", "fgsm@0/255", "fgsm@4/255", "fgsm@0.1", "pgd@0/255",
                                                   "pgd@4/255", "pgd@0.1"]
    pgd_line = lines[-1]
    assert pgd_line.startswith("robustness: pgd@0.1 top1 ") and "% (40 images, " in pgd_line and pgd_line.endswith(" s)")
    assert f"top1 {100 * counts['pgd@0.1'] / 40:.1f}%" in pgd_line


def test_progress_prints_on_the_main_process_only(capsys, monkeypatch):
    model = _model()
    x, y = torch.rand(4, 3, 4, 4, dtype=torch.float64), torch.randint(0, 5, (4,))
    monkeypatch.delenv("RANK", raising=False)
    adversarial_counts(model, x, y, [0.05], attacks="fgsm")
    assert capsys.readouterr().out.count("robustness: ") == 2  # clean, fgsm@0.05
    monkeypatch.setenv("RANK", "1")
    adversarial_counts(model, x, y, [0.05], attacks="fgsm")
    adversarial_counts(model, x, y, [0.05], attacks="fgsm", progress=False)
    assert capsys.readouterr().out == ""
