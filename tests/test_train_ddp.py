"""DDP through torchrun (2 CPU processes, gloo) against a single process with the same global batch.

This file is also the worker script: ``torchrun ... tests/test_train_ddp.py --worker OUT_DIR``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unrollattn.train import (
    LoopConfig, OptimConfig, cleanup, epoch_batch_indices, fit, init_distributed, latest_checkpoint, read_metrics,
    wrap_model,
)
from unrollattn.utils.dist import all_reduce_mean, all_reduce_sum, unwrap_model

STEPS = 8
OPTIM = OptimConfig(lr=0.05, warmup_steps=2, weight_decay=0.01, grad_clip=1.0)


class TeacherTask:
    """Classify points labelled by a fixed random teacher network; no dropout, so runs are comparable."""

    def __init__(self, loop):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(320, 16, generator=g)
        teacher = torch.randn(16, 4, generator=g)
        y = (x @ teacher).argmax(-1)
        self.x, self.y, self.vx, self.vy = x[:256], y[:256], x[256:], y[256:]
        self.loop = loop
        self.model = None

    def build_model(self):
        self.model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        return self.model

    def batch(self, step, micro, state):
        idx = epoch_batch_indices(len(self.x), self.loop.batch_size, step, micro, self.loop.grad_accum,
                                  state.rank, state.world_size, self.loop.seed)
        return self.x[idx], self.y[idx]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y), {}

    def evaluate(self, model, state):
        # each rank scores its shard of the validation set; sums are all-reduced
        shard = slice(state.rank, None, state.world_size)
        logits = model(self.vx[shard].to(state.device))
        loss_sum = F.cross_entropy(logits, self.vy[shard].to(state.device), reduction="sum")
        total = all_reduce_sum(loss_sum, state)
        count = all_reduce_sum(float(len(self.vy[shard])), state)
        return {"val_loss": total / count}

    def items_per_batch(self, batch):
        return len(batch[0])


def _loop(out_dir, name, grad_accum):
    return LoopConfig(max_steps=STEPS, batch_size=32, grad_accum=grad_accum, eval_every=4, log_every=1, ckpt_every=4,
                      device="cpu", out_dir=str(out_dir), run_name=name, progress=False)


def _worker(out_dir: Path) -> None:
    loop = _loop(out_dir / "runs", "ddp", grad_accum=1)
    task = TeacherTask(loop)
    summary = fit(task, loop, OPTIM)
    state = init_distributed("cpu")
    assert state.world_size == 2 and summary["world_size"] == 2
    # test scaffolding outside the run directory: each rank's final weights
    torch.save(task.model.state_dict(), out_dir / f"weights_rank{state.rank}.pt")
    cleanup(state)


def run_torchrun_worker(script: str, out_dir: Path, timeout: float = 300, *, nproc: int = 2, mode: str = "--worker"
                        ) -> None:
    """``torchrun --standalone --nproc_per_node=NPROC SCRIPT MODE OUT_DIR`` (one thread per rank, no torchrun
    variables inherited from this process); AssertionError with the output tail when it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(script).resolve()), mode, str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def test_ddp_two_processes_match_single_process(tmp_path):
    run_torchrun_worker(__file__, tmp_path)

    # only rank 0 wrote the run directory: one line per step, world size recorded
    run = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    assert {"config.json", "env.json", "metrics.jsonl", "summary.csv", "checkpoints"} <= {p.name for p in run.iterdir()}
    ddp_losses = [r["train_loss"] for r in read_metrics(run) if "train_loss" in r]
    assert [r["step"] for r in read_metrics(run) if "train_loss" in r] == list(range(1, STEPS + 1))
    assert '"world_size": 2' in (run / "env.json").read_text()

    # gradients were averaged: both ranks hold identical weights, equal to the checkpoint
    w0 = torch.load(tmp_path / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights_rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    from safetensors.torch import load_file

    saved = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert all(torch.equal(w0[k], saved[k]) for k in w0)

    # same global batch in one process (2 accumulation steps instead of 2 ranks)
    loop = _loop(tmp_path / "single", "single", grad_accum=2)
    task = TeacherTask(loop)
    single = fit(task, loop, OPTIM)
    single_losses = [r["train_loss"] for r in read_metrics(Path(single["run_dir"])) if "train_loss" in r]
    assert len(single_losses) == STEPS
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)
    for k, v in task.model.state_dict().items():
        torch.testing.assert_close(w0[k], v, rtol=1e-4, atol=1e-5)
    ddp_val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    single_val = [r["val_loss"] for r in read_metrics(Path(single["run_dir"])) if "val_loss" in r]
    torch.testing.assert_close(torch.tensor(ddp_val), torch.tensor(single_val), rtol=1e-5, atol=1e-6)
    assert ddp_losses[-1] < ddp_losses[0]  # it learned something


def test_single_process_helpers_without_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    state = init_distributed("cpu")
    assert (state.rank, state.world_size, state.backend, state.is_main) == (0, 1, None, True)
    assert state.device == torch.device("cpu")
    assert all_reduce_mean(torch.tensor(2.5), state) == 2.5 and all_reduce_sum(4, state) == 4.0
    model = nn.Linear(2, 2)
    assert wrap_model(model, state) is model and unwrap_model(model) is model
    with pytest.raises(ValueError, match="expected 'auto', 'cpu'"):
        init_distributed("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed("cuda")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=3"):
        init_distributed("cpu")


if __name__ == "__main__" and "--worker" in sys.argv:
    torch.set_num_threads(1)
    _worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
