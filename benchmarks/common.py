"""Measurement helpers shared by the benchmarks: wall-clock timing, peak tensor memory and FLOP counts."""
from __future__ import annotations

import contextlib
import functools
import platform
import statistics
import time
from pathlib import Path

import torch

from unrollattn.core.validation import finite_checks_enabled, set_finite_checks
from unrollattn.utils.denormals import flush_denormals
from unrollattn.utils.memory import peak_memory_mb  # noqa: F401  (re-exported for the benchmarks)
from unrollattn.utils.params import count_parameters
from unrollattn.utils.tables import write_table


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (processors differ in speed on subnormal floats, SIMD width, caches: a
    table is comparable only with one from the same model) and the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads, {memory_allocator()}"


def memory_allocator() -> str:
    """The C allocator this process runs on: ``tcmalloc`` or ``jemalloc`` when one is loaded (``LD_PRELOAD``), else
    ``glibc malloc`` (Linux) / ``system malloc``. Large CPU tensors are malloc'd and freed on every call, and glibc
    hands big blocks back to the kernel, so the allocator changes the graph models' speed by up to 2x."""
    try:
        with open("/proc/self/maps") as maps:
            loaded = maps.read()
    except OSError:
        return "system malloc"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in loaded:
            return name
    return "glibc malloc" if "libc.so" in loaded else "system malloc"


def cpu_model() -> str:
    """The first ``model name`` of /proc/cpuinfo (Linux), else the platform's processor or machine string."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and ":" in line:
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    return time_interleaved({None: fn}, device, warmup, repeats)[None]


def time_interleaved(calls: dict, device: torch.device, warmup: int = 2, repeats: int = 5) -> dict:
    """{key: median seconds of ``calls[key]()``}: ``warmup`` untimed calls of each first, then ``repeats`` rounds
    that time each call once in turn, so a change of machine load during the run reaches every call alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[key].append(time.perf_counter() - start)
    return {key: statistics.median(times) for key, times in samples.items()}


def print_row(row: dict, columns: list[str]) -> None:
    """One measurement as ``key=value`` pairs, flushed, so a long run shows progress."""
    print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in columns), flush=True)


def publish_table(rows: list[dict], columns: list[str], *, name: str, title: str, argv, out_dir, device: torch.device,
                  note: str | None = None, variant: str = "") -> str:
    """Write the markdown table (``note`` under it), headed by ``title`` and the command that made it (the module
    ``benchmarks.<name>``), to ``out_dir/<name>[_<variant>]_<cpu|cuda>.md``; print it and return it."""
    import sys

    command = f"python -m benchmarks.{name} " + " ".join(argv if argv is not None else sys.argv[1:])
    tag = "cuda" if device.type == "cuda" else "cpu"
    document = write_table(rows, columns, Path(out_dir) / f"{name}{'_' + variant if variant else ''}_{tag}.md",
                           heading=f"# {title}\n\nCommand: `{command.strip()}`", note=note)
    print("\n" + document)
    return document


@contextlib.contextmanager
def counting_flops():
    """A ``FlopCounterMode`` whose ``get_total_flops()`` includes attention: SDPA runs on its math backend inside,
    as plain matmuls the counter sees (it has no formula for the CPU flash kernel, which it would count as 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        yield counter


def measure_layers(layers: dict, dim: int, heads: int, seq_len: int, batch: int, device, dtype, repeats: int,
                   is_causal: bool = False) -> list[dict]:
    """Forward + backward time and peak memory of each token-mixing layer of ``layers`` ({name: module}) on a
    [batch, seq_len, dim] input (``is_causal``: the layer contract's causal flag, as a language model calls it), the
    layers timed in turn round by round (:func:`time_interleaved`), so that a change of machine load reaches every
    layer and every ratio between them alike."""
    steps, causal = {}, {"is_causal": True} if is_causal else {}
    for name, layer in layers.items():
        layer = layer.to(device=device, dtype=dtype)
        x = torch.randn(batch, seq_len, dim, device=device, dtype=dtype, requires_grad=True)

        def step(layer=layer, x=x):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x, **causal).float().square().mean().backward()

        steps[name] = step
    seconds = time_interleaved(steps, device, warmup=2, repeats=repeats)
    return [{"width": dim, "heads": heads, "seq_len": seq_len, "batch": batch, "variant": name,
             "params": count_parameters(layers[name]), "fwd_bwd_ms": seconds[name] * 1e3,
             "tokens_per_s": batch * seq_len / seconds[name], "peak_mem_mb": peak_memory_mb(steps[name], device)}
            for name in layers]


VOCABS = {"byte": (257, 256), "gpt2": (50257, 50256)}  # (vocab size, end-of-text id)


def selected_lm_variants(text: str) -> list[str]:
    """The named LM labels (default: every registered causal-LM variant); each a registered variant or an
    ``attention-block`` pair of registered names (an unknown name lists the registered ones)."""
    from unrollattn.recipes.lm import TASK
    from unrollattn.registry import ATTENTIONS, BLOCKS, model_variants, variant_fields

    known = model_variants(TASK)
    labels = [v.strip() for v in text.split(",") if v.strip()] if text else known
    for label in labels:
        fields = variant_fields(label)
        if fields["variant"] is not None and fields["variant"] not in known:
            raise ValueError(f"unknown variant {label!r}; registered: {', '.join(known)} (or attention-block)")
        if fields["variant"] is None:
            ATTENTIONS.get(fields["attention"]), BLOCKS.get(fields["block"])
    return labels


def add_lm_arguments(parser) -> None:
    """The options every LM benchmark shares: which variants (a user's own with --import) at which GPT-2 shape."""
    parser.add_argument("--variants", default="", help="comma-separated registered LM variants or attention-block "
                        "labels (default: every registered causal-LM variant)")
    parser.add_argument("--import", dest="imports", default="", metavar="MODULES",
                        help="comma-separated modules to import first (e.g. one registering your own attention)")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4, help="GPT-2-equivalent depth (equal parameters)")
    parser.add_argument("--vocab", default="byte", choices=sorted(VOCABS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def build_matched_lm(label: str, *, width: int, heads: int, depth: int, vocab: str, n_positions: int):
    """LM ``label`` at ``width`` / ``heads`` whose layer stack has the parameters of GPT-2 at ``depth`` layers
    (``model.match_params=gpt2``, computed on the meta device)."""
    from unrollattn.recipes.lm import ModelConfig, build_lm, parse_model_label

    vocab_size, eos = VOCABS[vocab]
    mc = ModelConfig(**parse_model_label(label), size="tiny", depth=depth, match_params="gpt2", n_embd=width,
                     n_head=heads)
    return build_lm(mc, vocab_size=vocab_size, eos_token_id=eos, n_positions=n_positions)


def benchmark_settings(main):
    """Run a benchmark's ``main`` as training runs, with subnormals flushed to zero on CPU (utils/denormals.py), and
    with the NaN/inf input guard off (it is a host sync: measure the operators themselves); restore both settings
    afterwards, so calling it in-process leaves no trace."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        previous = finite_checks_enabled()
        set_finite_checks(False)
        try:
            with flush_denormals():
                return main(*args, **kwargs)
        finally:
            set_finite_checks(previous)
    return wrapper
