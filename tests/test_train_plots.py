"""Loss plots: one colour per run, training solid, validation dashed with markers, on one labelled axes."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from unrollattn.train import RunDir, comparison_figure, curves_figure, plot_comparison, plot_curves  # noqa: E402


@pytest.fixture
def runs(tmp_path):
    out = {}
    for i, name in enumerate(["vit", "crate"]):
        run = RunDir.create(tmp_path, name, {})
        for step in range(1, 9):
            run.log(step, train_loss=2.0 / step + i)
        run.log(8, val_loss=1.1 + i)  # evaluated once, at the end (as the quick presets do)
        out[name] = {"params": 1000 * (i + 1), "top1": 90.0 - i, "run_dir": str(run.dir)}
    return out


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_comparison_gives_each_variant_one_colour_and_tells_train_from_validation(runs, tmp_path):
    fig = comparison_figure(runs, metric="top1")
    try:
        ax = fig.axes[1]
        lines = _lines(ax)
        for name in runs:
            train, val = lines[f"{name} train_loss"], lines[f"{name} val_loss"]
            assert train.get_color() == val.get_color()
            assert train.get_linestyle() == "-" and train.get_marker() in ("None", None, "")
            assert val.get_linestyle() == "--" and val.get_marker() == "o"
        assert lines["vit train_loss"].get_color() != lines["crate train_loss"].get_color()
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["vit", "crate", "training (solid)", "validation (dashed, markers)"]
        assert "step" in ax.get_xlabel() and "loss" in ax.get_ylabel()
        assert fig.axes[0].get_xlabel() == "parameters"
    finally:
        plt.close(fig)
    for summary in runs.values():
        summary["loss_label"] = "cross-entropy (nats/image)"
    fig = comparison_figure(runs)
    try:
        assert fig.axes[1].get_ylabel() == "cross-entropy (nats/image)"
    finally:
        plt.close(fig)
    assert plot_comparison(runs, tmp_path / "cmp").read_bytes()[:4] == b"\x89PNG"


def test_curves_draw_validation_on_the_training_axes(runs, tmp_path):
    fig = curves_figure(runs["vit"]["run_dir"], ylabel="cross-entropy (nats/token)")
    try:
        (ax,) = fig.axes  # one panel: the single validation point sits on the training curve's axes
        lines = _lines(ax)
        assert set(lines) == {"vit train_loss", "vit val_loss"}
        assert lines["vit val_loss"].get_marker() == "o" and lines["vit val_loss"].get_markersize() >= 4
        assert ax.get_xlabel() == "step (optimizer updates)" and ax.get_ylabel() == "cross-entropy (nats/token)"
    finally:
        plt.close(fig)
    fig = curves_figure(runs["vit"]["run_dir"], keys=("train_loss", "val_loss", "lr"))
    try:
        assert [a.get_title() for a in fig.axes] == ["loss curves", "lr"]  # non-loss keys get their own panel
    finally:
        plt.close(fig)
    png = plot_curves(runs["vit"]["run_dir"])
    assert png.name == "curves.png" and png.read_bytes()[:4] == b"\x89PNG"
