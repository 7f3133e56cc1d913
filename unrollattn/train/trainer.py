"""The one training loop of unrollattn: a recipe supplies a :class:`Task`, :func:`fit` does the rest.

``fit`` handles torchrun (DDP, or FSDP2 with ``loop.parallel=fsdp``), seeding, optimizer + schedule, gradient accumulation, bf16 autocast,
clipping, logging (metrics.jsonl, summary.csv, tqdm), evaluation, atomic checkpoints and exact
resume. Exact resume needs no data-loader state: ``Task.batch`` is a pure function of (step,
micro-batch, rank) (the built-in tasks: a slice of the step's global batch, the same on any number of ranks)
and the RNG is re-seeded from (seed, step, rank) at the start of every step.

Step numbers: ``Task.batch(step, ...)`` receives the 0-based index of the optimizer step; logs and
checkpoints count completed steps, so the first update is logged as step 1 and a run of
``max_steps`` ends with a checkpoint at step ``max_steps``; resuming from the checkpoint of step
``k`` continues with ``Task.batch(k, ...)``.

Nothing a run has written is lost: ``--resume`` continues from the newest complete checkpoint (an
older one when the newest fails its check) and refuses when there is none but the directory holds
history, or when the config changed in a key outside ``RESUME_MUTABLE_KEYS``; a checkpoint is only
written of finite weights; Ctrl-C saves the last completed step and raises :class:`TrainingInterrupted`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import re
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..utils.denormals import flush_denormals
from ..utils.params import count_parameters
from .checkpoint import (
    CheckpointError, checkpoint_dir_for_step, latest_checkpoint, list_checkpoints, load_checkpoint,
    load_sharded_checkpoint, prune_checkpoints, save_checkpoint, save_sharded_checkpoint, verify_checkpoint,
)
from .config import LoopConfig, OptimConfig, config_to_dict
from ..utils.dist import (
    DistState, all_reduce_sum, all_reduce_tensor, main_rank_only, micro_batch_size, micro_batch_slice, step_seed,
    unwrap_model,
)
from ..utils.memory import LiveTensorBytes, optimizer_state_bytes, tensor_bytes
from .distributed import init_distributed, materialize_replica, meta_replica, shard_model, wrap_model
from .optim import build_optimizer, build_scheduler
from .runlog import DEFAULT_LOSS_LABEL, RunDir, RunDirError, plot_curves, progress_bar

__all__ = ["Task", "TrainingInterrupted", "count_params", "epoch_batch_indices", "fit", "to_device"]


@runtime_checkable
class Task(Protocol):
    """What a recipe implements to be trained by :func:`fit`.

    Optional:

    - ``final_evaluate(model, state) -> dict[str, float]``: called on every rank after the final checkpoint with
      the trained model in eval mode (gradients enabled, e.g. for adversarial attacks); its metrics join the
      summary and result.json, its time ``final_eval_s`` is part of ``wall_s``.
    - ``export(model, run_dir: Path)`` is called on the main rank after the final
      checkpoint (e.g. to write a ``save_pretrained`` directory).
    - ``run_info() -> dict``: fields that describe the run (model name, data, sizes) for the summary and
      result.json, which ``fit`` writes once.
    - ``summary_fields(summary) -> dict``: fields computed from the finished run's summary (say parameters net of
      the embeddings, or aliases of metrics), called on every rank and merged into the summary before result.json
      is written; what ``fit`` returns is what result.json holds.
    - ``loss_label``: a string naming the training loss with its unit for plot axes, e.g.
      ``"cross-entropy (nats/token)"`` (default ``"loss (mean per item)"``); when set, also in the summary.
    """

    def build_model(self) -> nn.Module:
        """A fresh model (``fit`` seeds the RNG first, moves it to the device and wraps it)."""

    def batch(self, step: int, micro: int, state: DistState) -> Any:
        """Micro-batch ``micro`` of 0-based optimizer step ``step`` on this rank: a deterministic function of
        (step, micro, state.rank) with ``micro_batch_size(batch_size, grad_accum, world_size)`` items; the built-in
        tasks draw the step's global batch and keep ``micro_batch_slice(...)`` of it, so a step's data does not depend
        on the number of ranks.
        Tensors inside (also in lists/tuples/dicts) are moved to ``state.device`` by ``fit``."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """Scalar training loss and extra metrics to log (the same keys on every rank)."""

    def evaluate(self, model: nn.Module, state: DistState) -> dict[str, float]:
        """Validation metrics, e.g. ``{"val_loss": ..., "top1": ...}``; called on every rank under
        ``torch.no_grad()`` and ``model.eval()``; the task all-reduces across ranks itself. Losses (keys
        ``loss`` or ``*_loss``) must be finite: a NaN loss stops the run before it is checkpointed."""

    def items_per_batch(self, batch: Any) -> int:
        """Number of images / tokens in ``batch`` (for throughput)."""


# ----------------------------------------------------------------------------------------------
# helpers usable by tasks


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_items: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_items, generator=generator)


def epoch_batch_indices(num_items: int, batch_size: int, step: int, micro: int, grad_accum: int, rank: int,
                        world_size: int, seed: int) -> Tensor:
    """Dataset indices of micro-batch ``micro`` of step ``step`` on ``rank``.

    The items are a stream of per-epoch random permutations (``torch.randperm`` seeded with
    ``seed + epoch``); step ``step`` takes the next ``batch_size`` of them, split into
    ``world_size * grad_accum`` chunks, chunk ``micro * world_size + rank`` going to this call.
    Every item is visited once per epoch, ranks never overlap, and the result depends on the
    arguments only, so resuming needs no sampler state. The same global batch is used whether it
    is split over ranks or over accumulation steps.
    """
    chunk = micro_batch_slice(batch_size, grad_accum, world_size, micro, rank)
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items: expected an int >= 1, got {num_items!r}")
    if step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    mb = chunk.stop - chunk.start
    positions = torch.arange(step * batch_size + chunk.start, step * batch_size + chunk.stop, dtype=torch.long)
    epochs = positions // num_items
    offsets = positions % num_items
    out = torch.empty(mb, dtype=torch.long)
    for epoch in torch.unique(epochs).tolist():
        mask = epochs == epoch
        out[mask] = _epoch_permutation(num_items, seed + epoch)[offsets[mask]]
    return out


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors in a (nested) batch to ``device``; other values pass through."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        if type(batch) is dict:
            return moved
        try:
            return type(batch)(moved)
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    if hasattr(batch, "to") and callable(batch.to) and not isinstance(batch, nn.Module):  # e.g. BatchEncoding
        return batch.to(device)
    return batch


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once): :func:`unrollattn.utils.params.count_parameters`."""
    return count_parameters(unwrap_model(model), trainable_only)

def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % (1 << 32))
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------------
# fit


_REQUIRED = ("build_model", "batch", "loss", "evaluate")


def _check_task(task: Any) -> None:
    missing = [m for m in _REQUIRED if not callable(getattr(task, m, None))]
    if missing:
        raise TypeError(f"{type(task).__name__} is not a Task: missing method(s) {', '.join(missing)} "
                        f"(a Task needs {', '.join(_REQUIRED)} and items_per_batch)")


def _items(task: Any, batch: Any) -> int:
    if callable(getattr(task, "items_per_batch", None)):
        return int(task.items_per_batch(batch))
    first = batch
    while isinstance(first, (list, tuple, Mapping)) and len(first):
        first = next(iter(first.values())) if isinstance(first, Mapping) else first[0]
    return int(first.shape[0]) if isinstance(first, Tensor) and first.ndim else 0


def _call_loss(task: Any, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
    out = task.loss(model, batch)
    loss, metrics = (out if isinstance(out, tuple) and len(out) == 2 else (out, {}))
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"{type(task).__name__}.loss must return (scalar tensor, dict of floats), got {type(loss).__name__}"
                         + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
    if not loss.requires_grad:
        raise ValueError(f"{type(task).__name__}.loss returned a tensor without grad (computed under no_grad, or detached?)")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{type(task).__name__}.loss must return (loss, dict), got a {type(metrics).__name__} as metrics")
    return loss.reshape(()), metrics


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _evaluate(task: Any, model: nn.Module, state: DistState, precision: str) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(precision, state.device):
            metrics = task.evaluate(model, state)
    finally:
        model.train(was_training)
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{type(task).__name__}.evaluate must return a dict of floats, got {type(metrics).__name__}")
    return {str(k): float(v) for k, v in metrics.items()}


def _final_evaluate(task: Any, model: nn.Module, state: DistState) -> tuple[dict[str, float], float]:
    """``task.final_evaluate(model, state)`` in eval mode (gradients on), announced and timed on the main rank."""
    name = f"{type(task).__name__}.final_evaluate"
    _print0(state, f"final evaluation ({name}) ...")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        metrics = task.final_evaluate(model, state)
    finally:
        model.train(was_training)
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{name} must return a dict of floats, got {type(metrics).__name__}")
    seconds = time.perf_counter() - t0
    _print0(state, f"final evaluation done in {seconds:.1f} s")
    return {str(k): float(v) for k, v in metrics.items()}, seconds


def _peak_memory(device: torch.device, cpu_peak_mb: float) -> tuple[str, float]:
    """CUDA: the allocator's peak. Elsewhere: parameters, optimizer state and the tensors alive during one step."""
    if device.type == "cuda":
        return "peak_mem_mb", torch.cuda.max_memory_allocated(device) / 2**20
    return "peak_mem_mb", cpu_peak_mb


def _print0(state: DistState, message: str) -> None:
    if state.is_main:
        print(message, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _auto_run_name(out_dir: str, prefix: str, resume: bool) -> str:
    root = Path(out_dir)
    if resume and root.is_dir():
        pattern = re.compile(re.escape(prefix) + r"-(\d{8}-\d{6})(?:-(\d+))?")
        previous = [(m.group(1), int(m.group(2) or 1), p.name) for p in root.iterdir()
                    if p.is_dir() and (m := pattern.fullmatch(p.name))]
        if previous:
            return max(previous)[2]
    name = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = name, 2
    while (root / candidate).exists():
        candidate, n = f"{name}-{n}", n + 1
    return candidate


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`, raised once the checkpoint of the last completed step is written.

    ``step``: the completed steps when it came; ``checkpoint`` / ``checkpoint_step``: the newest complete checkpoint
    (None when none could be written); ``run_dir`` / ``run_name``: the run, to resume with ``loop.resume``.
    """

    def __init__(self, step: int, run_dir: Path, run_name: str, checkpoint: Path | None, checkpoint_step: int | None):
        self.step, self.run_dir, self.run_name = step, Path(run_dir), run_name
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step
        saved = (f"checkpoint of step {checkpoint_step} in {checkpoint}" if checkpoint is not None
                 else "no checkpoint could be written")
        super().__init__(f"interrupted at step {step} of run {run_dir}; {saved}")


class _InterruptGuard:
    """While entered (main thread, default SIGINT handler only), Ctrl-C raises KeyboardInterrupt as usual, except
    inside ``critical()``, where it is held until the block ends: the optimizer and scheduler steps, the step
    counter and the step's log row then always move together, so the state saved on interruption is that of one
    completed, logged step."""

    def __init__(self):
        self._previous, self._depth, self._pending = None, 0, False

    def __enter__(self) -> "_InterruptGuard":
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._pending and not self._depth:  # reached only when the block did not raise
            self._pending = False
            raise KeyboardInterrupt


def _non_finite_tensors(model: nn.Module, state: DistState | None = None) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` that hold inf or nan. A sharded model's
    tensors are checked shard by shard; with ``state`` (a collective) the verdict is that of all ranks' shards."""
    from torch.distributed.tensor import DTensor

    tensors = {name: t.to_local() if isinstance(t, DTensor) else t for name, t in unwrap_model(model).state_dict().items()
               if isinstance(t, Tensor) and t.is_floating_point()}
    flags = torch.tensor([bool(t.numel()) and not bool(torch.isfinite(t).all()) for t in tensors.values()],
                         dtype=torch.float64)
    if state is not None:
        flags = all_reduce_tensor(flags, state, "sum")
    return [name for name, flag in zip(tensors, flags.tolist()) if flag]


def _check_finite_weights(model: nn.Module, step: int, run: RunDir, state: DistState) -> None:
    bad = _non_finite_tensors(model, state)
    if bad:
        kept = latest_checkpoint(run.dir)
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise FloatingPointError(f"the model weights are not finite at step {step} (inf/nan in {', '.join(bad[:5])}{more}); "
                                 f"no checkpoint was written for step {step} "
                                 f"({'the newest kept is ' + kept.name if kept is not None else 'none was kept'}). "
                                 "Lower optim.lr, raise optim.warmup_steps or check the data")


def _check_finite_eval(metrics: Mapping[str, float], step: int, run: RunDir) -> None:
    bad = {k: v for k, v in metrics.items() if (k == "loss" or k.endswith("_loss")) and not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"evaluation at step {step} gave non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; "
                                 f"stopped before checkpointing step {step} (metrics in {run.path('metrics.jsonl')})")


def _resume_point(run_dir: Path, *, evaluate_only: bool = False) -> tuple[Path | None, int | None, list[str]]:
    """The newest checkpoint of ``run_dir`` that passes :func:`verify_checkpoint` and its step (None, None if there
    is none), and a note for each newer one that failed. RunDirError when there is none but the directory holds
    history that a start from step 0 would replay over, unless ``evaluate_only`` (``loop.max_steps=0``) and that
    history is an evaluation of step 0 only, which evaluating again replaces."""
    skipped = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, int(verify_checkpoint(path)["step"]), skipped
        except CheckpointError as err:
            skipped.append(f"{path.name} skipped: {err}")
    history = RunDir(run_dir).history()
    if history is not None and not (evaluate_only and _only_step_zero(RunDir(run_dir))):
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise RunDirError(f"--resume: {run_dir} has no complete checkpoint to continue from{why}, but it holds an "
                          f"earlier run's history ({history}); nothing was changed. Restore a checkpoint to resume it, "
                          "or start a new run with another loop.run_name=NAME")
    return None, None, skipped


def _only_step_zero(run: RunDir) -> bool:
    """Whether every row ``run`` logged is of step 0 and it holds no checkpoint: the history of a zero-step run."""
    checkpoints = run.dir / "checkpoints"
    return (not (checkpoints.is_dir() and any(checkpoints.iterdir()))
            and all(r.get("step") == 0 for r in run.metrics()) and all(r.get("step") in ("0", "0.0") for r in run.summary_rows()))


@dataclasses.dataclass
class _Built:
    """The model of a run (sharded in place under ``loop.parallel=fsdp``), its optimizer and schedule (None when
    only evaluating), its parameter count, and under fsdp a meta-device copy from which the task's export gets a
    plain model."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    params: int
    export_replica: nn.Module | None = None


def _build_model_and_optimizer(task: Any, loop: LoopConfig, optim: OptimConfig, state: DistState) -> _Built:
    """The task's model on the device (built after seeding; sharded with FSDP2 under ``loop.parallel=fsdp``), its
    optimizer and schedule; with ``loop.max_steps=0`` (evaluation only) neither of the two. A model without
    trainable parameters is only evaluated."""
    _seed_all(loop.seed)
    model = task.build_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{type(task).__name__}.build_model must return an nn.Module, got {type(model).__name__}")
    model.to(state.device)
    params = count_params(model)
    replica = None
    if loop.parallel == "fsdp":
        replica = meta_replica(model) if callable(getattr(task, "export", None)) else None
        shard_model(model, state, loop.precision)
    if loop.max_steps == 0:
        return _Built(model, None, None, params, replica)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(task).__name__}.build_model gave a {type(model).__name__} without trainable "
                         "parameters; set loop.max_steps=0 to evaluate it without training")
    optimizer = build_optimizer(model, optim)
    return _Built(model, optimizer, build_scheduler(optimizer, optim, loop.max_steps), params, replica)


def _open_run(loop: LoopConfig, state: DistState, config_for_log: Any, run_name_prefix: str
              ) -> tuple[str, str | None, dict | None]:
    """On the main rank: (run name, checkpoint to resume from, the result of a finished zero-step run). The resume
    point is checked before the run directory gets config.json / env.json (:meth:`RunDir.create`)."""
    name = loop.run_name or _auto_run_name(loop.out_dir, run_name_prefix, loop.resume)
    ckpt, ckpt_step = None, None
    if loop.resume:
        ckpt, ckpt_step, skipped = _resume_point(Path(loop.out_dir) / name, evaluate_only=loop.max_steps == 0)
        for note in skipped:
            print(f"warning: {note}", flush=True)
    run = RunDir.create(loop.out_dir, name, config_for_log, resume=loop.resume, device=state.device,
                        world_size=state.world_size,
                        resume_from={"step": ckpt_step or 0, "checkpoint": ckpt.name if ckpt is not None else None})
    finished = None
    if loop.resume and loop.max_steps == 0 and ckpt is None and run.path("result.json").is_file():
        finished = json.loads(run.path("result.json").read_text(encoding="utf-8"))
    return name, (str(ckpt) if ckpt is not None else None), finished


def _restore(run: RunDir, checkpoint: str | None, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             scheduler: Any, loop: LoopConfig, state: DistState) -> int:
    """Load ``checkpoint`` (when resuming from one) and move the rows logged after it aside; returns the step to
    continue from (0 without a checkpoint)."""
    if checkpoint is not None and loop.parallel == "fsdp":
        info = load_sharded_checkpoint(Path(checkpoint), model=model, optimizer=optimizer, scheduler=scheduler,
                                       state=state)
    elif checkpoint is not None:
        info = load_checkpoint(Path(checkpoint), model=model, optimizer=optimizer, scheduler=scheduler,
                               map_location=state.device)
    if checkpoint is not None:
        start = info["step"]
        _print0(state, f"resuming {run.dir} from {Path(checkpoint).name} (step {start})")
        run.rewind(start)
        return start
    if loop.resume and loop.max_steps == 0:
        run.rewind(-1)  # the rows of an evaluation that did not finish move to the *.rewound.* files
        _print0(state, f"evaluating {run.dir} again (loop.max_steps=0: no training to resume, no result.json yet)")
    elif loop.resume:
        _print0(state, f"nothing to resume in {run.dir} yet (no checkpoint, no history); starting from step 0")
    return 0


def _with_task_fields(task: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with the task's ``run_info()`` before it and its ``summary_fields(summary)`` after it."""
    if callable(getattr(task, "run_info", None)):
        summary = {**task.run_info(), **summary}
    if callable(getattr(task, "summary_fields", None)):
        summary = {**summary, **task.summary_fields(dict(summary))}
    return summary


def _plain_model_for_export(built: _Built, state: DistState) -> nn.Module | None:
    """The model to hand to the task's export on the main rank: the trained model itself, or under fsdp (a
    collective) an unsharded CPU copy with the gathered weights on the main rank and None elsewhere."""
    if built.export_replica is None:
        return built.model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(built.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return materialize_replica(built.export_replica, full, built.model) if state.is_main else None


def _write_results(task: Any, model: nn.Module, run: RunDir, summary: dict[str, Any]) -> None:
    """On the main rank, once training and evaluation are done: curves.png, the task's export, then result.json."""
    loss_label = getattr(task, "loss_label", None)
    try:
        plot_curves({run.name: run.path("metrics.jsonl")}, out_png=run.path("curves.png"),
                    ylabel=loss_label or DEFAULT_LOSS_LABEL)
    except Exception as err:  # a plotting problem must not lose a finished run
        warnings.warn(f"could not plot loss curves: {err}", RuntimeWarning, stacklevel=2)
    if callable(getattr(task, "export", None)):
        task.export(model, run.dir)
    run.write_json("result.json", summary)


@dataclasses.dataclass
class _LogWindow:
    """The training steps since the last log row, summed on this rank (the row all-reduces them)."""

    loss: Tensor
    grad_norm: Tensor
    items: int = 0
    steps: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, device: torch.device) -> "_LogWindow":
        def zero() -> Tensor:
            return torch.zeros((), device=device, dtype=torch.float64)

        return cls(loss=zero(), grad_norm=zero())


class _TrainingLoop:
    """The optimizer steps of one :func:`fit`, from the restored step to ``loop.max_steps``, with the log rows,
    evaluations and checkpoints on their cadence; on Ctrl-C, :meth:`interrupted` saves the last completed step.

    ``done`` counts the completed steps; ``checkpoint`` / ``checkpoint_step`` are the newest complete checkpoint
    (the resumed one until a new one is written); ``train_loss`` is that of the last logged window and ``last_eval``
    the metrics of the last evaluation.
    """

    def __init__(self, task: Any, loop: LoopConfig, optim: OptimConfig, state: DistState, run: RunDir,
                 model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any, *, start: int,
                 resumed_checkpoint: str | None, t_begin: float, ddp_kwargs: dict | None):
        self.task, self.loop, self.optim, self.state, self.run = task, loop, optim, state, run
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.t_begin = state.device, t_begin
        self.start = self.done = start
        self.resumed = resumed_checkpoint is not None
        self.checkpoint = Path(resumed_checkpoint) if self.resumed else None
        self.checkpoint_step = start if self.resumed else None
        self.train_loss, self.last_eval, self.lr = math.nan, {}, math.nan
        self.trainable = [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
        self.cpu_peak_mb = tensor_bytes(model) / 2**20
        self.bar = progress_bar(loop.max_steps, initial=min(start, loop.max_steps), enabled=loop.progress,
                                is_main=state.is_main, desc=run.name)

        self.sharded = loop.parallel == "fsdp"  # the model is FSDP2-sharded already, its checkpoints collective
        self.compiled = torch.compile(model) if loop.compile else model
        self.train_model = (wrap_model(self.compiled, state, **(ddp_kwargs or {})) if optimizer is not None
                            and not self.sharded else self.compiled)
        self.is_ddp = self.train_model is not self.compiled

        self.steps_to_run = max(0, loop.max_steps - start)
        self.warm_steps = min(3, self.steps_to_run // 2)  # steps excluded from the summary throughput
        self.timed_from = time.perf_counter() if self.warm_steps == 0 else None
        self.timed_items, self.timed_excluded = 0, 0.0
        self.window = _LogWindow.empty(self.device)
        self.window_t0 = time.perf_counter()
        # CPU peak memory: parameters + optimizer state + tensors alive during the second step (the first one
        # also holds one-off allocations such as a task's data caches).
        self.tracked_step = start + 1 if loop.max_steps - start > 1 else start
        self.live_tensors = contextlib.ExitStack()
        self.batches = _prefetched_batches(task, state, start, loop) if loop.data_workers and self.steps_to_run else None

    def run_steps(self, guard: _InterruptGuard) -> None:
        """Every step left, each followed by its evaluation and checkpoint when they are due; with no step left, the
        evaluation of the model as it is."""
        for step in range(self.start, self.loop.max_steps):
            self.step(step, guard)
            t_pause = time.perf_counter()
            self.maybe_evaluate()
            self.maybe_checkpoint()
            self._exclude_pause(time.perf_counter() - t_pause)
        if self.steps_to_run == 0:
            self._evaluate_without_training()
        self.bar.close()

    def step(self, step: int, guard: _InterruptGuard) -> None:
        """Optimizer step ``step`` (0-based) over its ``loop.grad_accum`` micro-batches, then its log row when due.
        Ctrl-C is held from the update to the end of its log row: weights, optimizer, schedule, ``done`` and
        metrics.jsonl then always agree (see :class:`_InterruptGuard`)."""
        loop, device = self.loop, self.device
        _seed_all(step_seed(loop.seed, step, self.state.rank))
        self.train_model.train()
        tracker = LiveTensorBytes() if device.type != "cuda" and step == self.tracked_step else None
        if tracker is not None:
            self.live_tensors.enter_context(tracker)
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, step_items = self._accumulate_gradients(step)
        if self.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.optim.grad_clip)
            if self.sharded:  # a replicated DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
            self.window.grad_norm += grad_norm.detach().to(torch.float64)
        self.lr = self.optimizer.param_groups[0]["lr"]
        with guard.critical():
            self.optimizer.step()
            self.scheduler.step()
            if tracker is not None:
                self.live_tensors.close()
                self.cpu_peak_mb += (tracker.peak + optimizer_state_bytes(self.optimizer)) / 2**20
            self.done = step + 1
            self.window.loss += step_loss / loop.grad_accum
            self.window.items += step_items
            self.window.steps += 1
            if self.timed_from is not None:
                self.timed_items += step_items
            elif self.done - self.start == self.warm_steps:
                _sync(device)
                self.timed_from = time.perf_counter()
            self.bar.update(1)
            if self.done % loop.log_every == 0 or self.done == loop.max_steps:
                self.log()

    def _accumulate_gradients(self, step: int) -> tuple[Tensor, int]:
        """Forward and backward of every micro-batch of ``step`` (DDP and FSDP2 reduce the gradients on the last one
        only); returns the summed loss and the number of items."""
        loop, task = self.loop, self.task
        step_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        step_items = 0
        for micro in range(loop.grad_accum):
            batch = to_device(next(self.batches) if self.batches is not None else task.batch(step, micro, self.state),
                              self.device)
            last_micro = micro == loop.grad_accum - 1
            if self.sharded and loop.grad_accum > 1:
                self.model.set_requires_gradient_sync(last_micro)
            with (self.train_model.no_sync() if self.is_ddp and not last_micro else contextlib.nullcontext()):
                with _autocast(loop.precision, self.device):
                    loss, metrics = _call_loss(task, self.train_model, batch)
                (loss / loop.grad_accum).backward()
            step_loss += loss.detach().to(torch.float64)
            for key, value in metrics.items():
                self.window.metrics[key] = self.window.metrics.get(key, 0.0) + float(value) / loop.grad_accum
            step_items += _items(task, batch)
        return step_loss, step_items

    def log(self) -> None:
        """The log row of the window since the last one (all-reduced over the ranks) to metrics.jsonl and the
        console; FloatingPointError when its training loss is not finite."""
        _sync(self.device)
        window, loop = self.window, self.loop
        keys = sorted(window.metrics)
        packed = torch.cat([
            torch.stack([window.loss, window.grad_norm]).cpu(),
            torch.tensor([window.items, window.steps, *(window.metrics[k] for k in keys)], dtype=torch.float64),
        ])
        totals = all_reduce_tensor(packed, self.state, "sum").tolist()
        ranks_steps = totals[3]
        self.train_loss = train_loss = totals[0] / ranks_steps
        elapsed = max(time.perf_counter() - self.window_t0, 1e-9)
        mem = _peak_memory(self.device, self.cpu_peak_mb)
        row = {"train_loss": train_loss, "lr": self.lr}
        if self.optim.grad_clip > 0:
            row["grad_norm"] = totals[1] / ranks_steps
        row.update({k: totals[4 + i] / ranks_steps for i, k in enumerate(keys)})
        row.update({"items_per_s": totals[2] / elapsed, mem[0]: round(mem[1], 1),
                    "elapsed_s": round(time.perf_counter() - self.t_begin, 3)})
        self.run.log(self.done, **row)
        self.bar.set_postfix_str(f"loss {train_loss:.4f}")
        self.bar.write(f"step {self.done}/{loop.max_steps} | loss {train_loss:.4f} | lr {self.lr:.3g} | "
                       f"{row['items_per_s']:.1f} items/s")
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at step {self.done}; lower optim.lr, "
                                     "raise optim.warmup_steps or check the data (metrics in "
                                     f"{self.run.path('metrics.jsonl')})")
        self.window = _LogWindow.empty(self.device)

    def maybe_evaluate(self) -> None:
        """Evaluate after every ``loop.eval_every`` steps and after the last one."""
        if (self.loop.eval_every and self.done % self.loop.eval_every == 0) or self.done == self.loop.max_steps:
            self._evaluate_and_record(after_training=True)

    def maybe_checkpoint(self) -> None:
        """Checkpoint after every ``loop.ckpt_every`` steps and after the last one, of finite weights only."""
        if (self.loop.ckpt_every and self.done % self.loop.ckpt_every == 0) or self.done == self.loop.max_steps:
            _check_finite_weights(self.model, self.done, self.run, self.state)
            if self.sharded:
                self.checkpoint = self._save_sharded(self.done)
            else:
                self.checkpoint = main_rank_only(self.state, functools.partial(self._save, self.done))
            self.checkpoint_step = self.done

    def _exclude_pause(self, paused: float) -> None:
        """Leave the ``paused`` seconds of evaluating and checkpointing out of the throughputs."""
        if self.timed_from is not None:
            self.timed_excluded += paused
        if self.done % self.loop.log_every == 0:
            self.window_t0 = time.perf_counter()
        else:
            self.window_t0 += paused

    def _evaluate_and_record(self, *, after_training: bool) -> None:
        """Evaluate now: the metrics go to metrics.jsonl, summary.csv (with the training loss and learning rate
        ``after_training``) and the console; FloatingPointError for a non-finite loss."""
        self.last_eval = metrics = _evaluate(self.task, self.compiled, self.state, self.loop.precision)
        self.run.log(self.done, **metrics)
        self.run.summary({"step": self.done, "train_loss": self.train_loss, **metrics, "lr": self.lr} if after_training
                         else {"step": self.done, **metrics})
        self.bar.write(f"eval step {self.done}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        _check_finite_eval(metrics, self.done, self.run)

    def _evaluate_without_training(self) -> None:
        """With no step to run: the evaluation of step 0 (``loop.max_steps=0``), or of the resumed checkpoint with
        the training loss it last logged."""
        if not self.resumed:  # loop.max_steps=0: the one evaluation is step 0's
            self._evaluate_and_record(after_training=False)
            return
        # nothing left to train: report the checkpoint's metrics
        self.last_eval = _evaluate(self.task, self.compiled, self.state, self.loop.precision)
        rows = self.run.metrics
        previous = main_rank_only(self.state, lambda: next((r["train_loss"] for r in reversed(rows()) if "train_loss" in r), None))
        self.train_loss = math.nan if previous is None else previous

    def _save(self, step_done: int) -> Path:
        target = checkpoint_dir_for_step(self.run.dir, step_done)
        save_checkpoint(target, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, step=step_done,
                        extra={"run_name": self.run.name, "world_size": self.state.world_size})
        prune_checkpoints(self.run.dir, self.loop.keep_checkpoints)
        return target

    def _save_sharded(self, step_done: int) -> Path:
        """Collective: the sharded checkpoint of ``step_done``, with the full weights (model.safetensors) when it
        is the last step."""
        target = checkpoint_dir_for_step(self.run.dir, step_done)
        save_sharded_checkpoint(target, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                step=step_done, state=self.state, full_weights=step_done == self.loop.max_steps,
                                extra={"run_name": self.run.name, "world_size": self.state.world_size})
        main_rank_only(self.state, lambda: prune_checkpoints(self.run.dir, self.loop.keep_checkpoints))
        return target

    def items_per_second(self) -> float:
        """Training items per second over all ranks after the warm-up steps, evaluations and checkpoints excluded
        (a collective: every rank calls it)."""
        timed_time = (time.perf_counter() - self.timed_from - self.timed_excluded) if self.timed_from is not None else 0.0
        total_timed_items = all_reduce_sum(float(self.timed_items), self.state)
        return total_timed_items / timed_time if timed_time > 0 and total_timed_items > 0 else math.nan

    def summary(self, *, params: int, final_metrics: dict[str, float], final_eval_s: float | None) -> dict[str, Any]:
        """What :func:`fit` returns (before the task's fields), once the steps and the final evaluation are done
        (a collective: every rank calls it)."""
        _sync(self.device)
        loss_label = getattr(self.task, "loss_label", None)
        mem = _peak_memory(self.device, self.cpu_peak_mb)
        items_per_s = self.items_per_second()
        return {
            "run_dir": str(self.run.dir),
            "steps": self.done,
            "start_step": self.start,
            "params": params,
            "train_loss": self.train_loss,
            **self.last_eval,
            "train_items_per_s": items_per_s,
            "peak_mem_mb": round(mem[1], 1),
            "peak_mem_source": "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_tensor_bytes_one_step",
            "world_size": self.state.world_size,
            "checkpoint": str(self.checkpoint) if self.checkpoint is not None else None,
            **final_metrics,
            **({"final_eval_s": round(final_eval_s, 3)} if final_eval_s is not None else {}),
            **({"loss_label": loss_label} if loss_label else {}),
            "wall_s": round(time.perf_counter() - self.t_begin, 3),
        }

    def interrupted(self) -> TrainingInterrupted:
        """After Ctrl-C: the main rank saves the last completed step (no collective: the other ranks are being
        interrupted too), unless it is saved already or its weights are not finite. A second Ctrl-C abandons the
        save; the atomic writer then leaves the previous checkpoint as it was. A sharded model (fsdp) is not saved:
        its checkpoint needs every rank, which may each have stopped at another point; the newest periodic
        checkpoint is the one to resume from."""
        if (self.state.is_main and self.optimizer is not None and not self.sharded and self.checkpoint_step != self.done
                and not _non_finite_tensors(self.model)):
            with contextlib.suppress(KeyboardInterrupt):
                self.checkpoint, self.checkpoint_step = self._save(self.done), self.done
        return TrainingInterrupted(self.done, self.run.dir, self.run.name, self.checkpoint, self.checkpoint_step)

    def close(self) -> None:
        self.live_tensors.close()
        self.bar.close()
        self.batches = None  # the DataLoader's workers exit with their iterator


class _StepBatches(torch.utils.data.Dataset):
    """Item k = micro-batch k % grad_accum of step start + k // grad_accum on this rank (``Task.batch``)."""

    def __init__(self, task: Any, state: DistState, start: int, loop: LoopConfig):
        self.task, self.state, self.start, self.loop = task, state, start, loop

    def __len__(self) -> int:
        return (self.loop.max_steps - self.start) * self.loop.grad_accum

    def __getitem__(self, k: int) -> Any:
        step, micro = divmod(k, self.loop.grad_accum)
        return self.task.batch(self.start + step, micro, self.state)


def _prefetched_batches(task: Any, state: DistState, start: int, loop: LoopConfig):
    """The micro-batches of steps start.. in order, built by ``loop.data_workers`` DataLoader workers (two batches
    ahead each; pinned for CUDA)."""
    loader = torch.utils.data.DataLoader(_StepBatches(task, state, start, loop), batch_size=None, shuffle=False,
                                         num_workers=loop.data_workers, prefetch_factor=2,
                                         pin_memory=state.device.type == "cuda")
    return iter(loader)


@flush_denormals()  # CPU: subnormal floats flushed to zero while training (utils/denormals.py)
def fit(task: Task, loop: LoopConfig, optim: OptimConfig, *, run_name_prefix: str = "run",
        config_for_log: Any = None, ddp_kwargs: dict | None = None) -> dict[str, Any]:
    """Train ``task`` for ``loop.max_steps`` optimizer steps; return a summary dict.

    The summary has the final evaluation metrics, ``train_loss`` (last logged window),
    ``params``, ``train_items_per_s`` (after the first few steps, eval excluded), ``peak_mem_mb``
    (+ ``peak_mem_source``), ``steps``, ``start_step``, ``run_dir``, ``checkpoint`` and ``wall_s``.
    ``config_for_log`` (the recipe's whole config) goes to config.json; by default ``loop`` and
    ``optim``. ``run_name_prefix`` names runs when ``loop.run_name`` is empty
    (``<prefix>-<timestamp>``; with ``loop.resume`` the newest such run is continued).
    """
    t_begin = time.perf_counter()
    _check_task(task)
    if not isinstance(loop, LoopConfig) or not isinstance(optim, OptimConfig):
        raise TypeError(f"fit expects (task, LoopConfig, OptimConfig), got ({type(task).__name__}, "
                        f"{type(loop).__name__}, {type(optim).__name__})")
    loop, optim = dataclasses.replace(loop), dataclasses.replace(optim)  # re-run their validation

    state = init_distributed(loop.device)
    device = state.device
    micro_batch_size(loop.batch_size, loop.grad_accum, state.world_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    built = _build_model_and_optimizer(task, loop, optim, state)
    model, optimizer, scheduler = built.model, built.optimizer, built.scheduler

    if config_for_log is None:
        config_for_log = {"loop": config_to_dict(loop), "optim": config_to_dict(optim)}
    run_name, resume_ckpt, finished = main_rank_only(
        state, functools.partial(_open_run, loop, state, config_for_log, run_name_prefix))
    run = RunDir(Path(loop.out_dir) / run_name, is_main=state.is_main)
    if finished is not None:
        _print0(state, f"{run.dir} is evaluated already (loop.max_steps=0, result.json): nothing to resume")
        return {**finished, "run_dir": str(run.dir)}
    start = _restore(run, resume_ckpt, model, optimizer, scheduler, loop, state)
    training = _TrainingLoop(task, loop, optim, state, run, model, optimizer, scheduler, start=start,
                             resumed_checkpoint=resume_ckpt, t_begin=t_begin, ddp_kwargs=ddp_kwargs)
    try:
        with _InterruptGuard() as guard:
            training.run_steps(guard)
            final_metrics, final_eval_s = {}, None
            if callable(getattr(task, "final_evaluate", None)):
                final_metrics, final_eval_s = _final_evaluate(task, model, state)
            summary = training.summary(params=built.params, final_metrics=final_metrics, final_eval_s=final_eval_s)
            summary = _with_task_fields(task, summary)
            export_model = _plain_model_for_export(built, state)
            main_rank_only(state, functools.partial(_write_results, task, export_model, run, summary))
    except KeyboardInterrupt:
        raise training.interrupted() from None
    finally:
        training.close()
    return summary
