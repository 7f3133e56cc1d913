"""Checkpoints: exact round-trip, tied weights, atomic saves, corruption and mismatch detection."""
import json
import os

import pytest
import torch
from torch import nn

import unrollattn.utils.io as atomic_io
from unrollattn.train import (
    CheckpointError, OptimConfig, build_optimizer, build_scheduler, checkpoint_dir_for_step, latest_checkpoint,
    load_checkpoint, prune_checkpoints, save_checkpoint,
)


class TiedNet(nn.Module):
    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("running", torch.zeros(3))

    def forward(self, idx):
        return self.head(self.norm(self.embed(idx)))


def _trained(seed=0, steps=3):
    torch.manual_seed(seed)
    model = TiedNet()
    cfg = OptimConfig(lr=0.05, warmup_steps=1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, max_steps=10)
    for _ in range(steps):
        idx = torch.randint(0, 11, (4, 5))
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.running += 1.5
    return model, opt, sched


def _fresh():
    torch.manual_seed(123)
    model = TiedNet()
    cfg = OptimConfig(lr=0.05, warmup_steps=1)
    opt = build_optimizer(model, cfg)
    return model, opt, build_scheduler(opt, cfg, max_steps=10)


def test_round_trip_restores_model_optimizer_scheduler(tmp_path):
    model, opt, sched = _trained()
    save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, scheduler=sched, step=3, extra={"cursor": 17, "name": "a"})
    assert sorted(os.listdir(tmp_path / "ck")) == ["checkpoint.json", "model.safetensors", "trainer_state.pt"]

    model2, opt2, sched2 = _fresh()
    info = load_checkpoint(tmp_path / "ck", model=model2, optimizer=opt2, scheduler=sched2)
    assert info == {"step": 3, "extra": {"cursor": 17, "name": "a"}}
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    assert model2.head.weight is model2.embed.weight  # still tied after loading
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])

    # the same next update from both
    idx = torch.randint(0, 11, (4, 5))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
        o.step()
    assert torch.equal(model.embed.weight, model2.embed.weight)


def test_weights_file_is_plain_safetensors_with_shared_tensor_stored_once(tmp_path):
    from safetensors.torch import load_file

    model, _, _ = _trained()
    save_checkpoint(tmp_path, model=model, step=0)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert ("embed.weight" in tensors) != ("head.weight" in tensors)
    index = json.loads((tmp_path / "checkpoint.json").read_text())
    assert index["step"] == 0 and set(index["files"]) == {"model.safetensors", "trainer_state.pt"}


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    model, opt, sched = _trained(steps=2)
    save_checkpoint(ck, model=model, optimizer=opt, scheduler=sched, step=2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    listing = sorted(os.listdir(ck))

    model_b, opt_b, sched_b = _trained(seed=1, steps=4)

    def crash_mid_write(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(ck, model=model_b, optimizer=opt_b, scheduler=sched_b, step=4)
    monkeypatch.undo()
    assert sorted(os.listdir(ck)) == listing  # no temp files left behind

    fresh, fresh_opt, fresh_sched = _fresh()
    assert load_checkpoint(ck, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)["step"] == 2
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_crash_while_moving_files_into_place_is_detected(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    model, opt, sched = _trained(steps=2)
    save_checkpoint(ck, model=model, optimizer=opt, scheduler=sched, step=2)

    real_replace = os.replace
    calls = {"n": 0}

    def replace_then_crash(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("power cut (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_io.os, "replace", replace_then_crash)
    model_b, opt_b, sched_b = _trained(seed=1, steps=4)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(ck, model=model_b, optimizer=opt_b, scheduler=sched_b, step=4)
    monkeypatch.undo()
    # one file is new, one old, and checkpoint.json still describes the old pair: refused, never mixed
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ck, model=_fresh()[0])


def test_trainer_layout_survives_a_crash_before_the_new_step_is_complete(tmp_path, monkeypatch):
    model, opt, sched = _trained(steps=2)
    save_checkpoint(checkpoint_dir_for_step(tmp_path, 2), model=model, optimizer=opt, scheduler=sched, step=2)
    real_replace = os.replace

    def crash_on_index(src, dst):
        if str(dst).endswith("checkpoint.json"):
            raise OSError("killed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_io.os, "replace", crash_on_index)
    with pytest.raises(OSError):
        save_checkpoint(checkpoint_dir_for_step(tmp_path, 4), model=model, optimizer=opt, scheduler=sched, step=4)
    monkeypatch.undo()
    latest = latest_checkpoint(tmp_path)
    assert latest == checkpoint_dir_for_step(tmp_path, 2)
    assert load_checkpoint(latest, model=_fresh()[0])["step"] == 2
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(checkpoint_dir_for_step(tmp_path, 4), model=_fresh()[0])


def test_latest_and_prune(tmp_path):
    model, _, _ = _trained(steps=1)
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 10, 15):
        save_checkpoint(checkpoint_dir_for_step(tmp_path, step), model=model, step=step)
    assert latest_checkpoint(tmp_path).name == "step_00000015"
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step_00000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010", "step_00000015"]
    assert latest_checkpoint(checkpoint_dir_for_step(tmp_path, 10)) == checkpoint_dir_for_step(tmp_path, 10)


def test_corrupt_file_is_reported(tmp_path):
    model, opt, _ = _trained()
    save_checkpoint(tmp_path, model=model, optimizer=opt, step=3)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt.*sha256"):
        load_checkpoint(tmp_path, model=_fresh()[0])


def test_mismatched_model_names_keys_and_shapes(tmp_path):
    model, _, _ = _trained()
    save_checkpoint(tmp_path, model=model, step=1)

    class Other(TiedNet):
        def __init__(self):
            super().__init__(vocab=13)
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, model=Other())
    message = str(err.value)
    assert "embed.weight" in message and "(11, 6)" in message and "(13, 6)" in message
    assert "extra.weight" in message and "missing" in message

    class Fewer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(6)

    with pytest.raises(CheckpointError, match="unexpected.*(embed.weight|running)"):
        load_checkpoint(tmp_path, model=Fewer())
    fewer = Fewer()
    load_checkpoint(tmp_path, model=fewer, strict=False)  # partial load on request
    assert torch.equal(fewer.norm.weight, model.norm.weight)


def test_missing_directory_or_index(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", model=TiedNet())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="incomplete.*checkpoint.json"):
        load_checkpoint(tmp_path / "empty", model=TiedNet())
    model, _, _ = _trained()
    save_checkpoint(tmp_path / "ck", model=model, step=1)
    (tmp_path / "ck" / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.pt.*missing"):
        load_checkpoint(tmp_path / "ck", model=TiedNet())
    with pytest.raises(CheckpointError, match="optimizer"):
        save_checkpoint(tmp_path / "ck2", model=model, step=1)
        load_checkpoint(tmp_path / "ck2", model=TiedNet(), optimizer=build_optimizer(TiedNet(), OptimConfig()))


def test_unsafe_extra_is_rejected_at_save_time(tmp_path):
    with pytest.raises(CheckpointError, match=r"extra\['obj'\]"):
        save_checkpoint(tmp_path, model=TiedNet(), step=0, extra={"obj": object()})
    assert not (tmp_path / "checkpoint.json").exists()


def test_run_directory_readers_name_what_is_missing(tmp_path):
    from unrollattn.train import LoopConfig, load_latest_weights, read_run_config

    with pytest.raises(FileNotFoundError, match="expected a classify run directory"):
        read_run_config(tmp_path, LoopConfig, "classify")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_latest_weights(tmp_path, torch.nn.Linear(2, 2))
    model = torch.nn.Linear(2, 2)
    save_checkpoint(checkpoint_dir_for_step(tmp_path, 3), model=model, step=3)
    fresh = torch.nn.Linear(2, 2)
    assert torch.equal(load_latest_weights(tmp_path, fresh).weight, model.weight)


def test_prune_keeps_all_when_fewer_than_keep(tmp_path):
    model, _, _ = _trained(steps=1)
    save_checkpoint(checkpoint_dir_for_step(tmp_path, 5), model=model, step=5)
    assert prune_checkpoints(tmp_path, keep=2) == []  # first checkpoint of a run with keep_checkpoints=2
    assert prune_checkpoints(tmp_path, keep=3) == []
    save_checkpoint(checkpoint_dir_for_step(tmp_path, 10), model=model, step=10)
    assert prune_checkpoints(tmp_path, keep=2) == []
    assert [p.name for p in prune_checkpoints(tmp_path, keep=1)] == ["step_00000005"]


def _rewrite_index(directory, edit):
    index = json.loads((directory / "checkpoint.json").read_text())
    edit(index["files"])
    (directory / "checkpoint.json").write_text(json.dumps(index))


@pytest.mark.parametrize("verify", [True, False])
def test_index_names_are_confined_to_the_checkpoint_directory(tmp_path, verify):
    model, _, _ = _trained()
    ck = tmp_path / "ck"
    save_checkpoint(ck, model=model, step=1)
    index = json.loads((ck / "checkpoint.json").read_text())
    assert index["files"]["model.safetensors"]["bytes"] == (ck / "model.safetensors").stat().st_size
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 10)
    good = dict(index["files"])
    cases = {
        "/dev/zero": "absolute",  # would hang the sha256 of an unchecked loader
        str(outside): "absolute",
        "../outside.bin": r"'\.\.'",
        "sub/../../outside.bin": r"'\.\.'",
        "": "empty",
    }
    for name, why in cases.items():
        _rewrite_index(ck, lambda files, name=name: (files.clear(), files.update(good), files.update({name: {"sha256": "0"}})))
        with pytest.raises(CheckpointError, match=why):
            load_checkpoint(ck, model=_fresh()[0], verify=verify)
    _rewrite_index(ck, lambda files: (files.clear(), files.update(good)))
    load_checkpoint(ck, model=_fresh()[0], verify=verify)  # the repaired index loads again


def test_index_files_must_be_regular_files_of_the_recorded_size(tmp_path):
    model, _, _ = _trained()
    ck = tmp_path / "ck"
    save_checkpoint(ck, model=model, step=1)
    real = ck / "model.safetensors"
    moved = tmp_path / "elsewhere.safetensors"
    os.replace(real, moved)
    os.symlink(moved, real)  # a symlink escaping the directory
    with pytest.raises(CheckpointError, match="outside"):
        load_checkpoint(ck, model=_fresh()[0], verify=False)
    real.unlink()
    os.replace(moved, real)

    (ck / "fifo").mkdir()  # a directory (or a device) where the index promises a file
    _rewrite_index(ck, lambda files: files.update({"fifo": {"sha256": "0", "bytes": 0}}))
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(ck, model=_fresh()[0])
    _rewrite_index(ck, lambda files: files.pop("fifo"))

    _rewrite_index(ck, lambda files: files["model.safetensors"].update(bytes=files["model.safetensors"]["bytes"] + 1))
    with pytest.raises(CheckpointError, match="bytes"):
        load_checkpoint(ck, model=_fresh()[0], verify=False)
