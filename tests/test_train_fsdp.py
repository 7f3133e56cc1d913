"""FSDP2 (``loop.parallel=fsdp``) through torchrun (2 CPU processes, gloo) against a single process with the same
global batch, a crashed sharded run resumed from its sharded checkpoint, and what can be checked without torchrun.

This file is also the worker script: ``torchrun ... tests/test_train_fsdp.py --worker OUT_DIR``.
"""
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from test_train_ddp import OPTIM, STEPS, TeacherTask, run_torchrun_worker
from unrollattn.train import (
    RESUME_MUTABLE_KEYS, CheckpointError, ConfigError, LoopConfig, fit, init_distributed, latest_checkpoint,
    load_checkpoint, read_metrics, save_checkpoint,
)
from unrollattn.train.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from unrollattn.train.distributed import (
    fsdp_mixed_precision, fsdp_plan, materialize_replica, meta_replica, shard_model,
)
from unrollattn.utils.dist import DistState

CRASH_AT = 5  # 0-based step at which the interrupted run dies: after its checkpoint of step 4


class StackedNet(nn.Module):
    """A stem, a stack of blocks (what FSDP2 shards one by one) and a head, plus a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(32, 4)
        self.register_buffer("logit_offset", torch.zeros(4), persistent=False)

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x) + self.logit_offset


class StackedTeacherTask(TeacherTask):
    """The DDP test's task on :class:`StackedNet`; ``crash_at`` makes ``batch`` fail at that step on every rank."""

    def __init__(self, loop, crash_at=None):
        super().__init__(loop)
        self.crash_at = crash_at
        self.exported = None

    def build_model(self):
        self.model = StackedNet()
        return self.model

    def batch(self, step, micro, state):
        if step == self.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        return super().batch(step, micro, state)

    def export(self, model, run_dir):
        self.exported = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(self.exported, Path(run_dir) / "exported.pt")


def _loop(out_dir, name, *, grad_accum, parallel, resume=False):
    return LoopConfig(max_steps=STEPS, batch_size=32, grad_accum=grad_accum, eval_every=4, log_every=1, ckpt_every=4,
                      device="cpu", out_dir=str(out_dir), run_name=name, progress=False, keep_checkpoints=2,
                      parallel=parallel, resume=resume)


def _losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r]


def _worker(out_dir: Path) -> None:
    runs = out_dir / "runs"
    fit(StackedTeacherTask(_loop(runs, "fsdp", grad_accum=1, parallel="fsdp")), _loop(runs, "fsdp", grad_accum=1,
                                                                                          parallel="fsdp"), OPTIM)
    # The same run dies after its checkpoint of step 4 (both ranks fail at the same step), then resumes from it.
    cut = _loop(runs, "cut", grad_accum=2, parallel="fsdp")
    try:
        fit(StackedTeacherTask(cut, crash_at=CRASH_AT), cut, OPTIM)
    except RuntimeError as err:
        assert "simulated crash" in str(err), err
    else:
        raise AssertionError("the interrupted run did not crash")
    resumed = _loop(runs, "cut", grad_accum=2, parallel="fsdp", resume=True)
    fit(StackedTeacherTask(resumed), resumed, OPTIM)
    state = init_distributed("cpu")
    assert state.world_size == 2
    dist.destroy_process_group()


def _resume_on_one_rank(out_dir: Path) -> None:
    """The crashed 2-rank run's copy (``runs/cut-one``, its newest checkpoint the sharded one of step 4) resumed by a
    single FSDP2 rank: DCP reshards the weights and optimizer state; the same global batch per step."""
    resumed = _loop(out_dir / "runs", "cut-one", grad_accum=2, parallel="fsdp", resume=True)
    fit(StackedTeacherTask(resumed), resumed, OPTIM)
    assert init_distributed("cpu").world_size == 1
    dist.destroy_process_group()


@pytest.mark.slow  # two torchrun launches (2 processes, then 1): three short runs, about half a minute on 2 cores
def test_fsdp_two_processes_match_single_process_and_resume_exactly(tmp_path):
    run_torchrun_worker(__file__, tmp_path, timeout=400)

    # sharded checkpoints: one DCP file per rank, the full weights in the final one only
    run = tmp_path / "runs" / "fsdp"
    step4, step8 = run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000008"
    index = json.loads((step4 / "checkpoint.json").read_text())
    assert index["layout"] == "sharded" and index["world_size"] == 2
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "trainer_state.pt"} == set(index["files"])
    assert "model.safetensors" in json.loads((step8 / "checkpoint.json").read_text())["files"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging directory left
    fsdp_losses = _losses(run)
    assert [r["step"] for r in read_metrics(run) if "train_loss" in r] == list(range(1, STEPS + 1))

    # one process, the same global batch (2 accumulation steps instead of 2 ranks)
    loop = _loop(tmp_path / "single", "single", grad_accum=2, parallel="ddp")
    task = StackedTeacherTask(loop)
    single = fit(task, loop, OPTIM)
    single_run = Path(single["run_dir"])
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(_losses(single_run)), rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    final = load_file(str(step8 / "model.safetensors"))
    assert set(final) == set(task.model.state_dict())
    for k, v in task.model.state_dict().items():
        torch.testing.assert_close(final[k], v, rtol=1e-4, atol=1e-5)
    exported = torch.load(run / "exported.pt", weights_only=True)  # the task's export got a plain, whole model
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert fsdp_losses[-1] < fsdp_losses[0]

    # weights of an intermediate sharded checkpoint load into a plain model in one process; its optimizer does not
    plain = StackedNet()
    load_checkpoint(step4, model=plain)
    single_step4 = load_file(str(single_run / "checkpoints" / "step_00000004" / "model.safetensors"))
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, single_step4[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="loop.parallel=fsdp"):
        load_checkpoint(step4, model=plain, optimizer=torch.optim.AdamW(plain.parameters()))

    # the crashed run resumed from step 4 and logged exactly the uninterrupted losses (with grad_accum=2 too)
    cut = tmp_path / "runs" / "cut"
    assert [r["step"] for r in read_metrics(cut) if "train_loss" in r] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor(_losses(cut)), torch.tensor(fsdp_losses), rtol=1e-5, atol=1e-6)
    cut_final = load_file(str(latest_checkpoint(cut) / "model.safetensors"))
    for k, v in final.items():
        torch.testing.assert_close(cut_final[k], v, rtol=1e-5, atol=1e-6)

    # a different world size: the 2-rank checkpoint of step 4 resumed by one rank gives the same steps 5..8
    one = tmp_path / "runs" / "cut-one"
    shutil.copytree(cut, one)
    shutil.rmtree(one / "checkpoints" / "step_00000008")
    assert latest_checkpoint(one).name == "step_00000004"
    run_torchrun_worker(__file__, tmp_path, timeout=300, nproc=1, mode="--resume-on-one")
    assert '"world_size": 1' in (one / "result.json").read_text()
    torch.testing.assert_close(torch.tensor(_losses(one)), torch.tensor(fsdp_losses), rtol=1e-5, atol=1e-6)
    one_final = load_file(str(latest_checkpoint(one) / "model.safetensors"))
    for k, v in final.items():
        torch.testing.assert_close(one_final[k], v, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# without torchrun


def test_parallel_option_is_validated_and_fixed_on_resume():
    assert LoopConfig().parallel == "ddp" and LoopConfig(parallel="fsdp").parallel == "fsdp"
    with pytest.raises(ConfigError, match=r"parallel: expected one of ddp, fsdp, got 'fdsp' \(did you mean 'fsdp'\?\)"):
        LoopConfig(parallel="fdsp")
    assert "loop.parallel" not in RESUME_MUTABLE_KEYS  # a sharded checkpoint resumes only as fsdp


def test_fsdp_without_torchrun_says_it_needs_torchrun(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    loop = _loop(tmp_path, "alone", grad_accum=1, parallel="fsdp")
    with pytest.raises(ValueError, match="loop.parallel=fsdp needs a torchrun process group"):
        fit(StackedTeacherTask(loop), loop, OPTIM)
    assert not (tmp_path / "alone").exists()  # refused before the run directory was made


def test_sharding_plan_is_each_block_then_the_root():
    assert fsdp_plan(StackedNet()) == ["blocks.0", "blocks.1", ""]
    assert fsdp_plan(nn.Sequential(nn.Linear(2, 2))) == [""]  # no layer stack: the whole model is one unit
    from unrollattn.recipes.lm import ModelConfig, build_lm

    with torch.device("meta"):
        lm = build_lm(ModelConfig(variant="gpt2", n_layer=2, n_embd=32, n_head=2), vocab_size=64, eos_token_id=0,
                      n_positions=16)
    assert fsdp_plan(lm) == ["transformer.h.0", "transformer.h.1", ""]


def test_mixed_precision_only_for_bf16_on_cuda():
    assert fsdp_mixed_precision("fp32", torch.device("cpu")) is None
    assert fsdp_mixed_precision("bf16", torch.device("cpu")) is None  # gloo / CPU: fp32 throughout
    assert fsdp_mixed_precision("fp32", torch.device("cuda", 0)) is None
    policy = fsdp_mixed_precision("bf16", torch.device("cuda", 0))
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_meta_replica_materializes_a_plain_copy():
    model = StackedNet()
    with torch.no_grad():
        model.logit_offset.fill_(0.5)
    replica = meta_replica(model)
    assert all(p.device.type == "meta" for p in replica.parameters())
    full = {k: v + 1 for k, v in model.state_dict().items()}
    plain = materialize_replica(replica, full, model)
    assert all(torch.equal(plain.state_dict()[k], full[k]) for k in full)
    assert torch.equal(plain.logit_offset, torch.full((4,), 0.5))  # non-persistent buffer from the live model


def test_meta_replica_keeps_tied_weights():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    plain = materialize_replica(meta_replica(model), {k: v.clone() for k, v in model.state_dict().items()}, model)
    assert plain[1].weight is plain[0].weight and torch.equal(plain[0].weight, model[0].weight)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process (FSDP2 and DCP run on it as on many)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield DistState(rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    finally:
        dist.destroy_process_group()


def test_sharded_checkpoint_round_trip_and_checks_in_one_rank(tmp_path, one_rank_group):
    state = one_rank_group
    model = shard_model(StackedNet(), state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    with pytest.raises(CheckpointError, match="save_sharded_checkpoint"):
        save_checkpoint(tmp_path / "plain", model=model, step=1)
    target = tmp_path / "checkpoints" / "step_00000001"
    save_sharded_checkpoint(target, model=model, optimizer=optimizer, scheduler=None, step=1, state=state)
    again = shard_model(StackedNet(), state)
    optimizer2 = torch.optim.AdamW(again.parameters(), lr=0.01)
    assert load_sharded_checkpoint(target, model=again, optimizer=optimizer2, scheduler=None, state=state)["step"] == 1
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), name
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"].full_tensor(),
                       optimizer2.state_dict()["state"][0]["exp_avg"].full_tensor())
    # a second save of the same step replaces the first whole
    save_sharded_checkpoint(target, model=model, optimizer=optimizer, scheduler=None, step=1, state=state)
    assert sorted(p.name for p in target.parent.iterdir()) == ["step_00000001"]

    wider = StackedNet()
    wider.stem = nn.Linear(16, 64)
    wider = shard_model(wider, state)
    with pytest.raises(CheckpointError, match=r"does not match the model: shape mismatch .*stem.weight: checkpoint "
                                              r"\(32, 16\) vs model \(64, 16\)"):
        load_sharded_checkpoint(target, model=wider, optimizer=None, scheduler=None, state=state)
    with pytest.raises(CheckpointError, match="is sharded"):
        load_checkpoint(target, model=again)
    single_file = tmp_path / "single"
    save_checkpoint(single_file, model=StackedNet(), step=1)
    with pytest.raises(CheckpointError, match="single-file checkpoint .* resume the run with loop.parallel=ddp"):
        load_sharded_checkpoint(single_file, model=again, optimizer=None, scheduler=None, state=state)


if __name__ == "__main__" and "--worker" in sys.argv:
    torch.set_num_threads(1)
    _worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
elif __name__ == "__main__" and "--resume-on-one" in sys.argv:
    torch.set_num_threads(1)
    _resume_on_one_rank(Path(sys.argv[sys.argv.index("--resume-on-one") + 1]))
