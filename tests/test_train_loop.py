"""The shared training loop: exact resume, gradient accumulation, run directory, schedule, ablation tables."""
import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from unrollattn.train import (
    ConfigError, LoopConfig, OptimConfig, RunDir, RunDirError, build_optimizer, compare, epoch_batch_indices, fit,
    latest_checkpoint, lr_factor,
    param_groups, plot_comparison, plot_curves, read_metrics,
)
from unrollattn.utils.dist import micro_batch_size


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x[:1500], y[:1500], x[1500:], y[1500:]


class DigitsTask:
    """2-layer MLP on scikit-learn digits, with dropout so that the RNG matters."""

    def __init__(self, data, loop, *, dropout=0.3, crash_at_step=None, crash_with=RuntimeError, nan_at_step=None):
        self.x, self.y, self.vx, self.vy = data
        self.loop, self.dropout = loop, dropout
        self.crash_at_step, self.crash_with, self.nan_at_step = crash_at_step, crash_with, nan_at_step

    def build_model(self):
        return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Dropout(self.dropout), nn.Linear(48, 10))

    def batch(self, step, micro, state):
        if step == self.crash_at_step:
            raise self.crash_with("simulated crash")
        idx = epoch_batch_indices(len(self.x), self.loop.batch_size, step, micro, self.loop.grad_accum,
                                  state.rank, state.world_size, self.loop.seed)
        return {"x": self.x[idx], "y": self.y[idx], "step": step}

    def loss(self, model, batch):
        logits = model(batch["x"])
        loss = F.cross_entropy(logits, batch["y"])
        if batch["step"] == self.nan_at_step:
            loss = loss * float("nan")
        return loss, {"acc": (logits.argmax(-1) == batch["y"]).float().mean().item()}

    def evaluate(self, model, state):
        logits = model(self.vx.to(state.device))
        y = self.vy.to(state.device)
        return {"val_loss": F.cross_entropy(logits, y).item(), "top1": 100.0 * (logits.argmax(-1) == y).float().mean().item()}

    def items_per_batch(self, batch):
        return int(batch["x"].shape[0])


def _loop(tmp_path, name, **kw):
    base = dict(max_steps=20, batch_size=32, grad_accum=2, eval_every=10, log_every=1, ckpt_every=5, device="cpu",
                out_dir=str(tmp_path), run_name=name, progress=False)
    base.update(kw)
    return LoopConfig(**base)


OPTIM = OptimConfig(lr=3e-3, warmup_steps=3, schedule="cosine", grad_clip=0.5)


def _train_losses(run_dir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir) if "train_loss" in r]


def test_exact_resume_after_interruption(tmp_path, digits):
    straight = fit(DigitsTask(digits, _loop(tmp_path, "straight")), _loop(tmp_path, "straight"), OPTIM)
    assert straight["steps"] == 20 and straight["start_step"] == 0

    loop = _loop(tmp_path, "interrupted")
    with pytest.raises(RuntimeError, match="simulated"):
        fit(DigitsTask(digits, loop, crash_at_step=12), loop, OPTIM)  # dies during step 13; last checkpoint: 10
    logged = [s for s, _ in _train_losses(tmp_path / "interrupted")]
    assert logged[-1] == 12  # steps 11 and 12 were logged before the crash
    assert latest_checkpoint(tmp_path / "interrupted").name == "step_00000010"
    before = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()

    resumed_loop = _loop(tmp_path, "interrupted", resume=True)
    resumed = fit(DigitsTask(digits, resumed_loop), resumed_loop, OPTIM)
    assert resumed["start_step"] == 10 and resumed["steps"] == 20

    a, b = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "interrupted")
    assert [s for s, _ in b] == list(range(1, 21))  # no duplicates from the replayed steps
    assert a == b  # bit-identical per-step losses
    # the replayed rows (steps 11, 12) are kept, verbatim, beside the log
    assert (tmp_path / "interrupted" / "metrics.rewound.jsonl").read_text().splitlines() == before[-2:]
    evals = [r["step"] for r in read_metrics(tmp_path / "interrupted") if "val_loss" in r]
    assert evals == [10, 20]
    assert resumed["val_loss"] == straight["val_loss"] and resumed["top1"] == straight["top1"]

    wa = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(tmp_path / "interrupted") / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # checkpoints are pruned to loop.keep_checkpoints, summary.csv has one row per evaluation
    assert [p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()] == ["step_00000020"]
    with open(tmp_path / "interrupted" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [10, 20] and {"train_loss", "val_loss", "top1", "lr"} <= rows[0].keys()


def test_data_workers_build_the_same_batches_and_resume_exactly(tmp_path, digits):
    """loop.data_workers=2: batches from DataLoader worker processes, in step order: the same losses and weights as
    in-process batches, and a crash in a worker's batch resumes exactly."""
    inline = fit(DigitsTask(digits, _loop(tmp_path, "inline")), _loop(tmp_path, "inline"), OPTIM)
    loop = _loop(tmp_path, "workers", data_workers=2)
    with pytest.raises(RuntimeError, match="simulated"):
        fit(DigitsTask(digits, loop, crash_at_step=12), loop, OPTIM)
    assert latest_checkpoint(tmp_path / "workers").name == "step_00000010"
    resumed_loop = _loop(tmp_path, "workers", data_workers=2, resume=True)
    resumed = fit(DigitsTask(digits, resumed_loop), resumed_loop, OPTIM)
    assert _train_losses(tmp_path / "workers") == _train_losses(tmp_path / "inline")
    assert resumed["val_loss"] == inline["val_loss"]
    wa = load_file(str(latest_checkpoint(tmp_path / "inline") / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(tmp_path / "workers") / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ConfigError, match="data_workers: expected an int >= 0"):
        _loop(tmp_path, "bad", data_workers=-1)


def test_dropout_seeding_differs_between_seeds(tmp_path, digits):
    a = fit(DigitsTask(digits, _loop(tmp_path, "s0", max_steps=3)), _loop(tmp_path, "s0", max_steps=3), OPTIM)
    b = fit(DigitsTask(digits, _loop(tmp_path, "s1", max_steps=3, seed=1)), _loop(tmp_path, "s1", max_steps=3, seed=1), OPTIM)
    assert a["train_loss"] != b["train_loss"]


def test_grad_accumulation_matches_one_big_batch(tmp_path, digits):
    one = _loop(tmp_path, "accum1", max_steps=6, grad_accum=1, ckpt_every=0)
    four = _loop(tmp_path, "accum4", max_steps=6, grad_accum=4, ckpt_every=0)
    fit(DigitsTask(digits, one, dropout=0.0), one, OPTIM)
    fit(DigitsTask(digits, four, dropout=0.0), four, OPTIM)
    la, lb = _train_losses(tmp_path / "accum1"), _train_losses(tmp_path / "accum4")
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 7))
    for (_, x), (_, y) in zip(la, lb):
        assert math.isclose(x, y, rel_tol=1e-5)


def test_run_directory_contents_and_summary(tmp_path, digits):
    loop = _loop(tmp_path, "contents", max_steps=4, log_every=2, eval_every=0, ckpt_every=0)
    summary = fit(DigitsTask(digits, loop), loop, OPTIM, config_for_log={"recipe": "digits", "loop": loop})
    run = tmp_path / "contents"
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.csv", "curves.png", "result.json"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == "digits" and config["loop"]["max_steps"] == 4
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["world_size"] == 1 and "git_hash" in env
    assert summary["params"] == 64 * 48 + 48 + 48 * 10 + 10
    assert summary["peak_mem_source"] == "cpu_tensor_bytes_one_step"
    assert summary["peak_mem_mb"] > summary["params"] * 4 / 2**20  # parameters plus one step's tensors
    assert summary["train_items_per_s"] > 0 and summary["wall_s"] > 0 and 0 <= summary["top1"] <= 100
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "train_loss" in r] == [2, 4]
    assert {"lr", "grad_norm", "acc", "items_per_s", "peak_mem_mb"} <= rows[0].keys()
    assert json.loads((run / "result.json").read_text())["val_loss"] == summary["val_loss"]


def test_fit_refuses_to_overwrite_a_run(tmp_path, digits):
    loop = _loop(tmp_path, "taken", max_steps=2, ckpt_every=0)
    fit(DigitsTask(digits, loop), loop, OPTIM)
    with pytest.raises(RunDirError, match="--resume.*loop.run_name=NAME"):
        fit(DigitsTask(digits, loop), loop, OPTIM)


def test_rundir_create_log_summary_rewind(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(RunDirError, match="not empty.*--resume.*loop.run_name"):
        RunDir.create(tmp_path, "busy", {"a": 1})
    RunDir.create(tmp_path, "busy", {"a": 1}, resume=True)  # allowed when resuming
    with pytest.raises(RunDirError, match="plain"):
        RunDir.create(tmp_path, "../escape", {})

    run = RunDir.create(tmp_path, "fresh", {"a": 1})
    for step in (1, 2, 3):
        run.log(step, train_loss=1.0 / step, lr=torch.tensor(0.1))
    run.summary({"step": 1, "val_loss": 0.5})
    run.summary({"step": 2, "val_loss": 0.4, "top1": 90.0})  # new column -> header rewritten
    run.summary({"step": 3, "val_loss": 0.3, "top1": 91.0})
    with open(run.path("summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "val_loss", "top1"] and rows[0]["top1"] == "" and rows[2]["top1"] == "91.0"
    assert read_metrics(run.dir)[0] == {"step": 1, "train_loss": 1.0, "lr": pytest.approx(0.1)}

    with open(run.path("metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "train_lo')  # torn last line of a crashed process
    run.rewind(2)
    assert [r["step"] for r in read_metrics(run.dir)] == [1, 2]
    assert [r["step"] for r in run.summary_rows()] == ["1", "2"]
    # nothing is lost: the rewound rows, the torn line too, are moved beside the log
    rewound = run.path("metrics.rewound.jsonl").read_text().splitlines()
    assert json.loads(rewound[0])["step"] == 3 and rewound[1] == '{"step": 4, "train_lo'
    with open(run.path("summary.rewound.csv")) as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["3"]

    silent = RunDir.create(tmp_path, "fresh", {"a": 1}, is_main=False)  # non-main ranks write nothing
    silent.log(9, train_loss=0.0)
    assert [r["step"] for r in read_metrics(run.dir)] == [1, 2]


def test_nan_loss_stops_training_with_a_clear_error(tmp_path, digits):
    loop = _loop(tmp_path, "nan", max_steps=6, ckpt_every=0)
    with pytest.raises(FloatingPointError, match="step 3"):
        fit(DigitsTask(digits, loop, nan_at_step=2), loop, OPTIM)


def test_epoch_batch_indices_cover_each_epoch_once_and_shard_disjointly():
    n, batch, accum, world = 50, 12, 2, 3
    mb = micro_batch_size(batch, accum, world)
    assert mb == 2
    seen = []
    for step in range(10):  # 120 items = 2.4 epochs
        for micro in range(accum):
            for rank in range(world):
                idx = epoch_batch_indices(n, batch, step, micro, accum, rank, world, seed=5)
                assert idx.shape == (mb,) and idx.dtype == torch.long
                seen.extend(idx.tolist())
    assert sorted(seen[:50]) == list(range(50)) and sorted(seen[50:100]) == list(range(50))
    assert seen[:50] != seen[50:100]  # a fresh permutation every epoch
    # the same global batch whether split over ranks or over accumulation steps
    ddp = torch.cat([epoch_batch_indices(n, 8, 3, 0, 1, r, 2, 0) for r in range(2)])
    accum_only = torch.cat([epoch_batch_indices(n, 8, 3, m, 2, 0, 1, 0) for m in range(2)])
    assert torch.equal(ddp, accum_only)
    assert not torch.equal(epoch_batch_indices(n, 8, 3, 0, 1, 0, 1, 0), epoch_batch_indices(n, 8, 3, 0, 1, 0, 1, 1))
    with pytest.raises(ValueError, match="divisible"):
        epoch_batch_indices(n, 10, 0, 0, 1, 0, 3, 0)
    with pytest.raises(ValueError, match="rank"):
        epoch_batch_indices(n, 8, 0, 0, 1, 2, 2, 0)


def test_lr_schedule_shapes():
    steps = 11
    cos = OptimConfig(warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(s, cos, steps) for s in range(steps)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert math.isclose(factors[-1], 0.1) and math.isclose(factors[6], 0.55)  # half-way point of the cosine
    lin = OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, lin, 5) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(7, OptimConfig(schedule="constant"), 10) == 1.0


def test_weight_decay_skips_biases_norms_and_named_params():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))

        def no_weight_decay(self):
            return {"pos_embed"}

    groups = param_groups(Net(), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == 1 and decay["params"][0].shape == (4, 4)
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4


def test_compare_and_plots_write_their_files(tmp_path):
    runs = {}
    for i, name in enumerate(["softmax", "mssa"]):
        run = RunDir.create(tmp_path, name, {})
        for step in range(1, 6):
            run.log(step, train_loss=2.0 / step + i)
        run.log(5, val_loss=1.0 + i)
        runs[name] = {"params": 1000 * (i + 1), "top1": 90.5 - i, "val_loss": 1.0 + i, "run_dir": str(run.dir)}
    runs["broken|name"] = {"params": 10, "top1": float("nan")}
    md = compare(runs, ["top1", "params", "val_loss"], tmp_path / "cmp")
    lines = md.strip().splitlines()
    assert lines[0] == "| variant | top1 | params | val_loss |"
    assert "| softmax | 90.5 | 1,000 | 1 |" in lines and "broken\\|name" in md
    with open(tmp_path / "cmp" / "comparison.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["variant", "top1", "params", "val_loss"] and rows[2] == ["mssa", "89.5", "2000", "2.0"]
    with pytest.raises(ValueError, match="top5.*available"):
        compare(runs, ["top5"], tmp_path / "cmp")
    png = plot_comparison(runs, tmp_path / "cmp", metric="top1")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = plot_curves({k: v["run_dir"] for k, v in runs.items() if "run_dir" in v}, out_png=tmp_path / "c.png")
    assert curves.stat().st_size > 1000


def test_auto_named_run_resumes_the_newest_run_of_its_prefix(tmp_path, digits):
    loop = LoopConfig(max_steps=2, batch_size=16, eval_every=0, log_every=1, device="cpu", out_dir=str(tmp_path),
                      progress=False)
    first = fit(DigitsTask(digits, loop), loop, OPTIM, run_name_prefix="digits-mlp")
    assert Path(first["run_dir"]).name.startswith("digits-mlp-")
    again = dataclasses.replace(loop, resume=True)
    second = fit(DigitsTask(digits, again), again, OPTIM, run_name_prefix="digits-mlp")
    assert second["run_dir"] == first["run_dir"] and second["start_step"] == 2 == second["steps"]
    assert second["val_loss"] == first["val_loss"] and second["train_loss"] == first["train_loss"]
    assert len(_train_losses(Path(first["run_dir"]))) == 2


def test_lion_update_rule():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = build_optimizer(nn.ParameterList([p]), OptimConfig(name="lion", lr=0.1, betas=(0.9, 0.99), weight_decay=0.0))
    p.grad = torch.tensor([0.5, -0.1, 0.0])
    opt.step()  # momentum starts at 0: update = -lr * sign(0.1 * g)
    assert torch.allclose(p.detach(), torch.tensor([0.9, -1.9, 3.0]))
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * torch.tensor([0.5, -0.1, 0.0]))


# ---------------------------------------------------------------------------------------------- resume & safety


def _bytes(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


def test_keep_two_checkpoints(tmp_path, digits):
    loop = _loop(tmp_path, "keep2", max_steps=12, ckpt_every=4, keep_checkpoints=2, eval_every=0, log_every=4)
    fit(DigitsTask(digits, loop), loop, OPTIM)
    assert sorted(p.name for p in (tmp_path / "keep2" / "checkpoints").iterdir()) == ["step_00000008", "step_00000012"]


def test_resume_without_a_checkpoint_refuses_and_keeps_the_history(tmp_path, digits):
    loop = _loop(tmp_path, "nockpt", max_steps=8, ckpt_every=0, eval_every=0)  # quick presets: checkpoint at the end
    with pytest.raises(RuntimeError, match="simulated"):
        fit(DigitsTask(digits, loop, crash_at_step=5), loop, OPTIM)
    before = _bytes(tmp_path / "nockpt")
    assert "metrics.jsonl" in before and not any(k.startswith("checkpoints/step") for k in before)
    again = dataclasses.replace(loop, resume=True)
    with pytest.raises(RunDirError, match=r"--resume.*no complete checkpoint.*5 row\(s\) in metrics.jsonl up to step 5"
                                          r".*nothing was changed.*loop.run_name"):
        fit(DigitsTask(digits, again), again, OPTIM)
    assert _bytes(tmp_path / "nockpt") == before  # not one byte changed


def test_resume_of_a_run_that_never_started_starts_at_step_zero(tmp_path, digits):
    loop = _loop(tmp_path, "new", max_steps=3, ckpt_every=0, resume=True)  # e.g. `ablate --resume` of a new variant
    assert fit(DigitsTask(digits, loop), loop, OPTIM)["start_step"] == 0


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, digits, capsys):
    loop = _loop(tmp_path, "corrupt", max_steps=10, ckpt_every=5, keep_checkpoints=2, eval_every=0)
    straight = fit(DigitsTask(digits, loop), loop, OPTIM)
    weights = tmp_path / "corrupt" / "checkpoints" / "step_00000010" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = dataclasses.replace(loop, resume=True)
    resumed = fit(DigitsTask(digits, again), again, OPTIM)
    assert resumed["start_step"] == 5 and resumed["train_loss"] == straight["train_loss"]
    assert "step_00000010 skipped" in capsys.readouterr().out
    assert [s for s, _ in _train_losses(tmp_path / "corrupt")] == list(range(1, 11))


def test_resume_refuses_a_changed_config_and_records_allowed_changes(tmp_path, digits):
    loop = _loop(tmp_path, "changed", max_steps=4, ckpt_every=0, eval_every=0)
    fit(DigitsTask(digits, loop), loop, OPTIM)
    run = tmp_path / "changed"
    before = _bytes(run)
    again = dataclasses.replace(loop, resume=True)
    with pytest.raises(ValueError, match=r"--resume.*optim.lr: 0.003 -> 0.5.*loop.max_steps"):
        fit(DigitsTask(digits, again), again, dataclasses.replace(OPTIM, lr=0.5))
    with pytest.raises(ValueError, match=r"loop.batch_size: 32 -> 64"):
        longer = dataclasses.replace(again, batch_size=64)
        fit(DigitsTask(digits, longer), longer, OPTIM)
    assert _bytes(run) == before

    longer = dataclasses.replace(again, max_steps=6, log_every=2)
    summary = fit(DigitsTask(digits, longer), longer, OPTIM)
    assert summary["start_step"] == 4 and summary["steps"] == 6
    assert json.loads((run / "config.json").read_text())["loop"]["max_steps"] == 6
    assert (run / "env.json").read_bytes() == before["env.json"]  # the first launch's record stays
    (entry,) = json.loads((run / "resume_changes.json").read_text())
    assert entry["step"] == 4 and entry["checkpoint"] == "step_00000004"
    assert entry["changes"]["loop.max_steps"] == {"old": 4, "new": 6}
    assert entry["changes"]["loop.log_every"] == {"old": 1, "new": 2} and "optim.lr" not in entry["changes"]
    assert entry["env"]["torch"] == torch.__version__

    fit(DigitsTask(digits, longer), longer, OPTIM)  # a second resume appends
    assert len(json.loads((run / "resume_changes.json").read_text())) == 2


class PoisonedTask(DigitsTask):
    """Training loss stays finite, but at ``poison_step`` an unused weight turns NaN / the evaluation loss is NaN."""

    def __init__(self, *args, poison_step=None, nan_eval_at=None, **kw):
        super().__init__(*args, **kw)
        self.poison_step, self.nan_eval_at, self.steps = poison_step, nan_eval_at, 0

    def build_model(self):
        model = super().build_model()
        model.register_parameter("unused", nn.Parameter(torch.zeros(3)))
        return model

    def loss(self, model, batch):
        if batch["step"] == self.poison_step:
            with torch.no_grad():
                model.unused.fill_(float("nan"))
        self.steps = batch["step"] + 1
        return super().loss(model, batch)

    def evaluate(self, model, state):
        out = super().evaluate(model, state)
        return {**out, "val_loss": float("nan")} if self.steps == self.nan_eval_at else out


def test_a_nan_model_is_never_checkpointed(tmp_path, digits):
    loop = _loop(tmp_path, "poison", max_steps=10, ckpt_every=5, eval_every=0)
    with pytest.raises(FloatingPointError, match=r"weights are not finite at step 10.*unused.*newest kept is step_00000005"):
        fit(PoisonedTask(digits, loop, poison_step=7), loop, OPTIM)
    assert latest_checkpoint(tmp_path / "poison").name == "step_00000005"

    loop = _loop(tmp_path, "nan-eval", max_steps=10, ckpt_every=5, eval_every=5)
    with pytest.raises(FloatingPointError, match=r"evaluation at step 10.*val_loss=nan"):
        fit(PoisonedTask(digits, loop, nan_eval_at=10), loop, OPTIM)
    assert latest_checkpoint(tmp_path / "nan-eval").name == "step_00000005"


# ---------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_saves_the_last_completed_step_and_resumes_exactly(tmp_path, digits):
    from unrollattn.train import TrainingInterrupted

    straight_loop = _loop(tmp_path, "straight", ckpt_every=0)
    straight = fit(DigitsTask(digits, straight_loop), straight_loop, OPTIM)
    loop = _loop(tmp_path, "ctrl-c", ckpt_every=0)  # like the quick presets: no periodic checkpoint
    with pytest.raises(TrainingInterrupted) as err:
        fit(DigitsTask(digits, loop, crash_at_step=12, crash_with=KeyboardInterrupt), loop, OPTIM)
    assert isinstance(err.value, KeyboardInterrupt)
    assert (err.value.step, err.value.checkpoint_step, err.value.run_name) == (12, 12, "ctrl-c")
    assert latest_checkpoint(tmp_path / "ctrl-c").name == "step_00000012"
    again = dataclasses.replace(loop, resume=True)
    resumed = fit(DigitsTask(digits, again), again, OPTIM)
    assert resumed["start_step"] == 12 and resumed["val_loss"] == straight["val_loss"]
    assert _train_losses(tmp_path / "ctrl-c") == _train_losses(tmp_path / "straight")


def test_ctrl_c_before_the_first_step_after_a_resume_names_the_resumed_checkpoint(tmp_path, digits):
    from unrollattn.train import TrainingInterrupted

    loop = _loop(tmp_path, "resumed-then-ctrl-c", max_steps=10, ckpt_every=5, eval_every=0)
    with pytest.raises(RuntimeError, match="simulated"):
        fit(DigitsTask(digits, loop, crash_at_step=5), loop, OPTIM)  # dies in step 6: the checkpoint of step 5 stays
    again = dataclasses.replace(loop, resume=True)
    with pytest.raises(TrainingInterrupted) as err:  # Ctrl-C in the first step after the resume
        fit(DigitsTask(digits, again, crash_at_step=5, crash_with=KeyboardInterrupt), again, OPTIM)
    kept = latest_checkpoint(tmp_path / "resumed-then-ctrl-c")
    assert (err.value.step, err.value.checkpoint_step, err.value.checkpoint) == (5, 5, kept)
    assert kept.name == "step_00000005"


def test_sigint_inside_the_optimizer_step_is_held_to_the_end_of_the_step(tmp_path, digits, monkeypatch):
    import signal

    from unrollattn.train import TrainingInterrupted

    real_step, calls = torch.optim.lr_scheduler.LambdaLR.step, []

    def interrupted_step(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4:  # the constructor steps once; then the third training step
            signal.raise_signal(signal.SIGINT)  # Ctrl-C between the optimizer and the scheduler step
        return real_step(self, *a, **kw)

    loop = _loop(tmp_path, "sigint", max_steps=6, ckpt_every=0, eval_every=0)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with SIGINT ignored
    try:
        with monkeypatch.context() as m:
            m.setattr(torch.optim.lr_scheduler.LambdaLR, "step", interrupted_step)
            with pytest.raises(TrainingInterrupted) as err:
                fit(DigitsTask(digits, loop, dropout=0.0), loop, OPTIM)
        assert err.value.checkpoint_step == 3 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    again = dataclasses.replace(loop, resume=True)
    fit(DigitsTask(digits, again, dropout=0.0), again, OPTIM)
    straight = _loop(tmp_path, "sigint-straight", max_steps=6, ckpt_every=0, eval_every=0)
    fit(DigitsTask(digits, straight, dropout=0.0), straight, OPTIM)
    assert _train_losses(tmp_path / "sigint") == _train_losses(tmp_path / "sigint-straight")


class RobustTask(DigitsTask):
    """A task with the optional hooks: a post-training evaluation (like the adversarial attacks) and a loss label."""

    loss_label = "cross-entropy (nats/image)"

    def final_evaluate(self, model, state):
        assert not model.training and torch.is_grad_enabled()
        import time

        time.sleep(0.3)
        return {"attacked_top1": 12.5}


def test_final_evaluation_joins_the_summary_and_the_wall_time(tmp_path, digits, capsys):
    loop = _loop(tmp_path, "final", max_steps=2, ckpt_every=0, eval_every=0)
    summary = fit(RobustTask(digits, loop), loop, OPTIM)
    assert summary["attacked_top1"] == 12.5 and summary["final_eval_s"] >= 0.3
    assert summary["wall_s"] >= summary["final_eval_s"] and summary["loss_label"] == "cross-entropy (nats/image)"
    assert json.loads((tmp_path / "final" / "result.json").read_text())["attacked_top1"] == 12.5
    out = capsys.readouterr().out
    assert "final evaluation (RobustTask.final_evaluate)" in out and "final evaluation done in" in out


class NearestMeanTask(DigitsTask):
    """A model without parameters (class means as buffers): evaluated with loop.max_steps=0, never trained."""

    def build_model(self):
        means = torch.stack([self.x[self.y == c].mean(0) for c in range(10)])
        model = nn.Module()
        model.register_buffer("means", means)
        model.forward = lambda x: -torch.cdist(x, model.means)
        return model


def test_zero_steps_evaluate_a_parameter_free_model_in_the_one_loop(tmp_path, digits):
    loop = _loop(tmp_path, "means", max_steps=0)
    summary = fit(NearestMeanTask(digits, loop), loop, OPTIM)
    run = tmp_path / "means"
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.csv", "curves.png", "result.json"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints").exists() and summary["checkpoint"] is None
    assert (summary["steps"], summary["params"], summary["start_step"]) == (0, 0, 0) and summary["top1"] > 80
    assert math.isnan(summary["train_loss"]) and math.isnan(summary["train_items_per_s"])
    assert read_metrics(run) == [{"step": 0, "val_loss": summary["val_loss"], "top1": summary["top1"]}]
    assert json.loads((run / "result.json").read_text())["top1"] == summary["top1"]

    # resuming the finished evaluation changes nothing it wrote (config.json and resume_changes.json record the
    # resume) and gives its result back
    written = lambda: {p.name: p.read_bytes() for p in run.iterdir()  # noqa: E731
                       if p.name not in ("config.json", "resume_changes.json")}
    before = written()
    again = fit(NearestMeanTask(digits, loop), dataclasses.replace(loop, resume=True), OPTIM)
    assert written() == before
    assert again == json.loads((run / "result.json").read_text())

    # an evaluation that stopped before result.json runs again; the earlier rows move to the rewound file
    (run / "result.json").unlink()
    redone = fit(NearestMeanTask(digits, loop), dataclasses.replace(loop, resume=True), OPTIM)
    assert redone["top1"] == summary["top1"] and len(read_metrics(run)) == 1
    assert len(read_metrics(run / "metrics.rewound.jsonl")) == 1


def test_training_a_model_without_parameters_is_refused(tmp_path, digits):
    loop = _loop(tmp_path, "means", max_steps=3)
    with pytest.raises(ValueError, match="without trainable parameters; set loop.max_steps=0"):
        fit(NearestMeanTask(digits, loop), loop, OPTIM)
    assert not (tmp_path / "means").exists()
    with pytest.raises(ValueError, match=r"max_steps: expected an int >= 0 \(0 = evaluate only\), got -1"):
        _loop(tmp_path, "x", max_steps=-1)
