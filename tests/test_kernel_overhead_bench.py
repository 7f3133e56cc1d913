"""benchmarks/kernel_overhead.py runs end to end on tiny shapes and writes its table (no timing asserted)."""
import pytest

from benchmarks import kernel_overhead
from unrollattn.core.validation import finite_checks_enabled


def test_kernel_overhead_writes_a_row_per_variant_and_shape(tmp_path, capsys):
    assert kernel_overhead.main(["--device", "cpu", "--widths", "16:2", "--seq-lens", "9,10", "--tokens-per-batch", "20",
                                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "kernel_overhead_cpu.md").read_text()
    assert "Command: `python -m benchmarks.kernel_overhead --device cpu --widths 16:2" in text
    rows = [line for line in text.splitlines() if line.startswith("| 16 ")]
    assert len(rows) == 2 * len(kernel_overhead.VARIANTS)
    assert all(" 1.00 |" in line for line in rows if "| mhsa |" in line)  # the baseline's own ratios
    assert finite_checks_enabled()  # the benchmark turned the NaN guard off only while it ran


def test_bilateral_gets_the_square_grid_and_bad_widths_fail():
    assert kernel_overhead.build_layer("bilateral", 16, 2, 64).grid == (8, 8)
    assert kernel_overhead.build_layer("bilateral", 16, 2, 10).grid is None  # 1-D positions
    with pytest.raises(ValueError, match="multiple of heads"):
        kernel_overhead.parse_widths("30:4")
    with pytest.raises(SystemExit):
        kernel_overhead.main(["--variants", "cosine", "--out", "/nonexistent"])
