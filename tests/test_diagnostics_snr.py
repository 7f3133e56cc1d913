"""The SNR diagnostic: Definition 1 sampler and the theorem's (1 + eta*tau) gain in its regime."""
import pytest
import torch

from unrollattn.diagnostics.snr import SubspaceMixture, main, run, snr_trajectory, subspace_snr


def test_mixture_sampler_follows_definition_1():
    mix = SubspaceMixture(subspaces=3, subspace_dim=4, tokens=30, delta=0.0)
    tokens, bases, labels = mix.sample(torch.Generator().manual_seed(0))
    assert tokens.shape == (30, 12) and bases.shape == (3, 12, 4)
    gram = torch.einsum("kdp,jdq->kpjq", bases, bases).reshape(12, 12)
    torch.testing.assert_close(gram, torch.eye(12, dtype=gram.dtype))  # [U_1..U_K] orthonormal
    assert (subspace_snr(tokens, bases, labels) > 1e10).all()  # delta = 0: no off-subspace energy


def test_first_layers_gain_exactly_one_plus_eta_tau():
    """Small delta, p >> log N: the thresholded softmax keeps only the self-similarity in the matching head."""
    mix = SubspaceMixture(subspaces=4, subspace_dim=32, tokens=128, delta=0.2)
    snrs = snr_trajectory(mix, layers=2, eta=0.2, tau=0.75)
    for before, after in zip(snrs, snrs[1:]):
        assert after / before == pytest.approx(1.15, rel=1e-6)


def test_plain_softmax_does_not_follow_the_theorem_gain():
    mix = SubspaceMixture(subspaces=4, subspace_dim=32, tokens=128, delta=0.2)
    snrs = snr_trajectory(mix, layers=3, eta=0.2, tau=None, nonlinearity="softmax")
    assert snrs[3] / snrs[0] < 1.15 ** 3 * 0.95


def test_bad_arguments():
    with pytest.raises(ValueError, match="tau"):
        run(deltas=(0.2,), layers=1, tau=0.4, tokens=64)
    with pytest.raises(ValueError, match="ambient_dim"):
        SubspaceMixture(subspaces=4, subspace_dim=8, ambient_dim=16)


def test_cli_writes_table_and_plot(tmp_path, capsys):
    assert main(["--layers", "2", "--tokens", "64", "--subspace-dim", "16", "--deltas", "0.2", "--tau", "0.55", "--out", str(tmp_path)]) == 0
    assert {"snr.md", "snr.csv", "snr.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "theory_gain" in capsys.readouterr().out
