"""benchmarks/attention_throughput.py runs end to end on tiny shapes over every registered attention and writes its
table (no timing asserted)."""
import pytest

from benchmarks import attention_throughput as bench
from unrollattn.core.validation import finite_checks_enabled
from unrollattn.registry import list_attentions


def test_a_row_per_registered_attention_and_shape(tmp_path):
    assert bench.main(["--device", "cpu", "--widths", "16:2", "--seq-lens", "9,10", "--tokens-per-batch", "20",
                       "--repeats", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "attention_throughput_cpu.md").read_text()
    assert "Command: `python -m benchmarks.attention_throughput --device cpu --widths 16:2" in text
    rows = [line for line in text.splitlines() if line.startswith("| 16 ")]
    names = {line.split("|")[5].strip() for line in rows}
    assert names == set(list_attentions()) | {bench.TIMM_REFERENCE}
    assert len(rows) == 2 * len(names)
    assert all(line.count(" 1 |") == 2 for line in rows if "| mhsa |" in line)  # the baseline's own ratios
    assert finite_checks_enabled()  # the benchmark turned the NaN guard off only while it ran


def test_causal_layout_writes_its_own_table(tmp_path):
    """--causal: every attention on 1-D causal sequences (the language-model call), in a table of its own; timm's
    Attention, which has no causal flag, is left out."""
    assert bench.main(["--device", "cpu", "--widths", "16:2", "--seq-lens", "16", "--tokens-per-batch", "16",
                       "--repeats", "1", "--causal", "--attentions", "mhsa,bilateral,alibi", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "attention_throughput_causal_cpu.md").read_text()
    assert "causal 1-D sequences" in text and not (tmp_path / "attention_throughput_cpu.md").exists()
    names = [line.split("|")[5].strip() for line in text.splitlines() if line.startswith("| 16 ")]
    assert names == ["mhsa", "bilateral", "alibi"]
    assert bench.build_layer("bilateral", 16, 2, 16, causal=True).grid is None


def test_square_lengths_get_the_grid_and_bad_arguments_fail():
    assert bench.build_layer("bilateral", 16, 2, 64).grid == (8, 8)
    assert bench.build_layer("glr", 16, 2, 64).grid == (8, 8)
    assert bench.build_layer("bilateral", 16, 2, 10).grid is None  # 1-D positions
    assert bench.selected_attentions("gaussian,mhsa", "mhsa", False) == ["mhsa", "gaussian"]
    with pytest.raises(ValueError, match="multiple of heads"):
        bench.parse_widths("30:4")
    with pytest.raises(ValueError, match="unknown attention.*cosine; registered: "):
        bench.selected_attentions("cosine", "mhsa", True)
    with pytest.raises(SystemExit):
        bench.main(["--attentions", "cosine", "--out", "/nonexistent"])


def test_interleaved_timing_warms_up_each_call_then_takes_turns():
    import torch

    from benchmarks.common import time_interleaved

    order = []
    medians = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                               torch.device("cpu"), warmup=1, repeats=2)
    assert order == ["a", "b", "a", "b", "a", "b"] and set(medians) == {"a", "b"}
    assert all(seconds >= 0 for seconds in medians.values())


def test_cpu_tables_name_the_processor_threads_and_allocator():
    """The CPU title says what a CPU figure depends on: processor model, threads and the C allocator."""
    import torch

    from benchmarks.common import cpu_model, device_name, memory_allocator

    assert memory_allocator() in {"glibc malloc", "system malloc", "tcmalloc", "jemalloc"}
    title = device_name(torch.device("cpu"))
    assert cpu_model() in title and f"{torch.get_num_threads()} threads" in title and memory_allocator() in title


@pytest.mark.parametrize("library", ["libtcmalloc_minimal.so.4", "libjemalloc.so.2"])
def test_a_preloaded_allocator_is_named(library):
    import os
    import subprocess
    import sys

    path = os.path.join("/usr/lib/x86_64-linux-gnu", library)
    if not os.path.exists(path):
        pytest.skip(f"{library} is not installed")
    out = subprocess.run([sys.executable, "-c", "from benchmarks.common import memory_allocator; "
                          "print(memory_allocator())"], capture_output=True, text=True, check=True,
                         env={**os.environ, "LD_PRELOAD": path})
    assert out.stdout.strip() == library.split(".")[0].removeprefix("lib").split("_")[0]


def test_layers_of_one_shape_are_timed_in_turn():
    """Every round times each layer once (a then b), so machine drift reaches the baseline and the attention alike;
    each row keeps its own layer's parameter count and timing."""
    import torch

    from benchmarks.common import measure_layers

    calls = []

    class Recorder(torch.nn.Linear):
        def __init__(self, name, width):
            super().__init__(width, width)
            self.name = name

        def forward(self, x, **kw):
            if torch.is_grad_enabled():
                calls.append(self.name)
            return super().forward(x)

    rows = measure_layers({"a": Recorder("a", 4), "b": Recorder("b", 4)}, 4, 1, 3, 2, torch.device("cpu"),
                          torch.float32, repeats=3)
    timed = calls[4:4 + 6]  # after two warm-up steps each
    assert timed == ["a", "b"] * 3
    assert [r["variant"] for r in rows] == ["a", "b"] and rows[0]["params"] == 20
