"""Optimizers and lr schedule (timm's Lion and weight-decay groups, transformers' WSD decay): values against the
formulas by hand, and exact resume of the schedule and optimizer state through a checkpoint."""
import math

import pytest
import torch
from torch import nn

from unrollattn.train import (
    ConfigError, Lion, OptimConfig, build_optimizer, build_scheduler, load_checkpoint, lr_factor, param_groups,
    save_checkpoint,
)


def _by_hand(step, warmup, max_steps, floor, schedule):
    """The schedule as documented: (step + 1) / warmup during warm-up, then cosine / linear from 1 to ``floor``
    at step max_steps - 1, the floor after it."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - 1 - warmup))
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - floor) * progress


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,max_steps,floor", [(3, 13, 0.2), (0, 7, 0.0), (2, 3, 0.1), (4, 4, 0.5), (1, 1, 0.3)])
def test_schedule_is_the_formula(schedule, warmup, max_steps, floor):
    cfg = OptimConfig(schedule=schedule, warmup_steps=warmup, min_lr_ratio=floor)
    got = [lr_factor(s, cfg, max_steps) for s in range(max_steps + 3)]
    want = [_by_hand(s, warmup, max_steps, floor, schedule) for s in range(max_steps + 3)]
    # cosine and constant are equal to the bit; transformers' linear decay, (1 - p) * (1 - floor) + floor, can differ
    # from 1 - (1 - floor) * p in the last bit
    assert got == pytest.approx(want, rel=1e-15, abs=1e-15)
    if schedule != "linear":
        assert got == want


def test_schedule_hand_values():
    cos = OptimConfig(warmup_steps=2, schedule="cosine", min_lr_ratio=0.2)
    # warm-up 1/2, 2/2; then 5 decay steps to the floor at step 6: 0.2 + 0.8 * (1 + cos(pi * k / 4)) / 2
    assert [lr_factor(s, cos, 7) for s in range(8)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.2 + 0.4 * (1 + math.sqrt(0.5)), 0.6, 0.2 + 0.4 * (1 - math.sqrt(0.5)), 0.2, 0.2])
    lin = OptimConfig(warmup_steps=1, schedule="linear", min_lr_ratio=0.5)
    assert [lr_factor(s, lin, 4) for s in range(5)] == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.5])
    with pytest.raises(ValueError, match="max_steps"):
        build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), cos, 0)


def test_unknown_schedule_is_a_config_error():
    cfg = OptimConfig()
    cfg.schedule = "step"  # bypasses the dataclass check
    with pytest.raises(ConfigError, match="optim.schedule"):
        lr_factor(0, cfg, 10)


def test_scheduler_follows_lr_factor_and_saves_no_schedule():
    cfg = OptimConfig(lr=0.3, warmup_steps=3, schedule="cosine", min_lr_ratio=0.1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.3 * lr_factor(s, cfg, 12) for s in range(12)]
    assert sched.state_dict()["lr_lambdas"] == [None]  # a closure, as before: old checkpoints' states still fit


def test_lion_is_the_formula_with_decoupled_weight_decay():
    lr, (b1, b2), wd = 0.1, (0.9, 0.99), 0.5
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    x, m = p.detach().clone(), torch.zeros(4)
    for g in (torch.tensor([0.5, -0.1, 0.0, 2.0]), torch.tensor([-1.0, 0.3, 0.2, -0.01])):
        p.grad = g.clone()
        opt.step()
        x = x * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
        assert torch.allclose(p.detach(), x, atol=1e-7) and torch.allclose(opt.state[p]["exp_avg"], m, atol=1e-7)


def test_lion_state_saved_before_timm_still_loads():
    p = nn.Parameter(torch.ones(3))
    opt = build_optimizer(nn.ParameterList([p]), OptimConfig(name="lion", lr=0.01, weight_decay=0.0))
    old = {"state": {0: {"exp_avg": torch.full((3,), 0.05)}},  # our former Lion's groups had only these keys
           "param_groups": [{"lr": 0.002, "betas": (0.9, 0.99), "weight_decay": 0.0, "params": [0]}]}
    opt.load_state_dict(old)
    p.grad = torch.tensor([1.0, -1.0, 0.0])
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.002 and opt.param_groups[0]["caution"] is False
    assert torch.allclose(p.detach(), torch.tensor([0.998, 1.002, 0.998]))  # -lr * sign(0.9 * 0.05 + 0.1 * g)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.tied = nn.Linear(4, 4, bias=False)
        self.tied.weight = self.lin.weight
        self.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)

    def no_weight_decay(self):
        return {"pos_embed", "cls_*"}  # timm's names may be patterns

    def forward(self, x):
        return self.tied(self.norm(self.lin(x) + self.pos_embed.mean() + self.cls_token.mean()))


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_param_groups_are_two_at_any_weight_decay(weight_decay):
    decay, no_decay = param_groups(_Net(), weight_decay)  # decay group first, both kept at 0: one state layout
    assert decay["weight_decay"] == weight_decay and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 5  # bias, norm x2, pos_embed, cls_token
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), 0.1)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_resume_mid_schedule_continues_exactly(tmp_path, name, schedule):
    cfg = OptimConfig(name=name, lr=0.02, weight_decay=0.1, warmup_steps=3, schedule=schedule, min_lr_ratio=0.1)
    total, cut = 12, 5
    torch.manual_seed(0)
    batches = [torch.randn(8, 4) for _ in range(total)]

    def run(model, opt, sched, steps, lrs):
        for x in steps:
            lrs.append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            model(batches[x]).square().mean().backward()
            opt.step()
            sched.step()

    def fresh():
        torch.manual_seed(1)
        model = _Net()
        opt = build_optimizer(model, cfg)
        return model, opt, build_scheduler(opt, cfg, total)

    model, opt, sched = fresh()
    straight = []
    run(model, opt, sched, range(total), straight)

    first, second = fresh(), fresh()
    resumed = []
    run(*first, range(cut), resumed)
    save_checkpoint(tmp_path / "ck", model=first[0], optimizer=first[1], scheduler=first[2], step=cut)
    load_checkpoint(tmp_path / "ck", model=second[0], optimizer=second[1], scheduler=second[2])
    run(*second, range(cut, total), resumed)
    assert resumed == straight == [cfg.lr * lr_factor(s, cfg, total) for s in range(total)]
    for (key, a), b in zip(model.state_dict().items(), second[0].state_dict().values()):
        assert torch.equal(a, b), key
