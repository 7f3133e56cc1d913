"""benchmarks/gpu_suite.sh: the prepared GPU run, exercised with --tiny on the CPU (no timing asserted)."""
import subprocess
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def run_suite(*args, timeout=600):
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, timeout=timeout)


def test_bad_options_are_named_and_help_answers():
    bad = run_suite("--fast")
    assert bad.returncode == 2 and "unknown option '--fast' (expected --tiny, --out=DIR or --help)" in bad.stderr
    help_ = run_suite("--help")
    assert help_.returncode == 0 and "--tiny" in help_.stdout


@pytest.mark.slow  # about a minute: every benchmark of the suite at toy sizes
def test_tiny_mode_writes_every_table(tmp_path):
    done = run_suite("--tiny", f"--out={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.glob("*.md"))
    assert names == ["attention_throughput_cpu.md", "graph_restoration_cpu.md", "lm_decoding_cpu.md",
                     "lm_throughput_cpu.md"]
    assert "| bilateral | compiled |" in (tmp_path / "lm_throughput_cpu.md").read_text()
