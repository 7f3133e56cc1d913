"""HF's ``Trainer`` (accelerate underneath) trains, checkpoints, resumes and saves an ``UnrollAttnForCausalLM``."""
import json

import pytest
import torch

try:
    import accelerate  # noqa: F401  (Trainer needs it; a test extra)
except ImportError as err:  # a failure, not a skip: the Trainer contract is tested on every run
    raise ImportError("tests/test_hf_trainer.py needs accelerate: pip install -e '.[test]' (or pip install accelerate)") from err

import unrollattn
from unrollattn.language import UnrollAttnForCausalLM
from unrollattn.language.tokenizer import ByteTokenizer

TEXT = "And the king went up to the house of the LORD. " * 40


class Windows(torch.utils.data.Dataset):
    """Fixed windows of ``block`` byte tokens of TEXT; labels are the inputs (the model shifts them)."""

    def __init__(self, block=32, stride=16):
        ids = torch.tensor(ByteTokenizer().encode(TEXT))
        self.rows = [ids[s: s + block] for s in range(0, len(ids) - block, stride)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "attention_mask": torch.ones_like(self.rows[i]), "labels": self.rows[i]}


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=3e-3,
                lr_scheduler_type="constant", max_steps=12, logging_steps=1, save_strategy="steps", save_steps=6,
                report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def test_trainer_trains_checkpoints_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    model = unrollattn.build_model("aot_mssa_lm_tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=257,
                                   eos_token_id=256, bos_token_id=256, n_positions=64)
    assert isinstance(model, UnrollAttnForCausalLM)
    data = Windows()
    trainer = Trainer(model=model, args=_args(tmp_path / "out"), train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert result.global_step == 12 and after < before - 0.5, (before, after)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))

    checkpoint = tmp_path / "out" / "checkpoint-6"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "unrollattn"

    trainer.save_model(tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert type(reloaded) is UnrollAttnForCausalLM
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # still tied
    batch = torch.stack([data[i]["input_ids"] for i in range(3)])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, model(input_ids=batch).logits)

    # resuming from the step-6 checkpoint repeats steps 7..12 exactly (weights, optimizer, scheduler, data order)
    again = Trainer(model=AutoModelForCausalLM.from_pretrained(checkpoint), args=_args(tmp_path / "out"),
                    train_dataset=data)
    again.train(resume_from_checkpoint=str(checkpoint))
    resumed = [r["loss"] for r in again.state.log_history if "loss" in r and r["step"] > 6]
    assert resumed == pytest.approx(losses[6:], rel=1e-4, abs=1e-5)


def test_trainer_with_activation_checkpointing_matches_plain_training(tmp_path):
    import dataclasses

    from transformers import Trainer, TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    flag = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    losses = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = unrollattn.build_model("crate_lm_tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64)
        args = _args(tmp_path / str(checkpointing), max_steps=4, save_strategy="no", **{flag: checkpointing})
        trainer = Trainer(model=model, args=args, train_dataset=Windows())
        trainer.train()
        assert model.transformer.gradient_checkpointing is checkpointing
        losses[checkpointing] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
