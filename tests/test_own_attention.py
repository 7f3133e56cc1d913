"""A user's own attention, defined outside the package and registered with the public decorator, works everywhere
with no edit inside the library: unrollattn list, timm names, the LM (cached decoding included), both recipes'
ablations (through --import) and the LM benchmark."""
import sys
import textwrap

import pytest
import timm
import torch

import unrollattn
from unrollattn import cli
from unrollattn.registry import ATTENTIONS

NAME = "elliptical_test"
MODULE = "my_elliptical_attention"
SOURCE = textwrap.dedent(f'''
    """A test-local attention: softmax attention with a learned positive scale per head on the logits."""
    import torch
    import torch.nn.functional as F

    import unrollattn
    from unrollattn.core.subspace import causal_sdpa, merge_heads
    from unrollattn.layers.attention import AttentionLayer


    @unrollattn.register_attention("{NAME}", summary="softmax attention with a learned per-head temperature")
    class Elliptical(AttentionLayer):
        def __init__(self, dim, num_heads=8, **kwargs):
            super().__init__(dim, num_heads, **kwargs)
            self.qkv = torch.nn.Linear(self.dim, 3 * self.inner_dim, bias=self.qkv_bias, **self.factory)
            self.proj = torch.nn.Linear(self.inner_dim, self.dim, bias=self.proj_bias, **self.factory)
            self.log_temperature = torch.nn.Parameter(torch.zeros(num_heads, 1, 1, **self.factory))

        def attend(self, x, attn_mask, is_causal, grid=None):
            q, k, v = self.project_qkv(x)
            q = q * self.log_temperature.exp()
            return self.proj(merge_heads(causal_sdpa(q, k, v, attn_mask, is_causal, dropout_p=self.attn_dropout)))
''')


@pytest.fixture
def own_attention(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield MODULE
    sys.modules.pop(MODULE, None)
    ATTENTIONS._entries.pop(NAME, None)  # other tests never see it
    ATTENTIONS._meta.pop(NAME, None)


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_own_attention_in_timm_the_lm_and_the_list(own_attention, capsys):
    __import__(own_attention)
    assert NAME in unrollattn.list_attentions()
    vit = timm.create_model("vit_unrolled_tiny_patch16_224", attention=NAME, block="aot", img_size=16, patch_size=8,
                            depth=2, embed_dim=32, num_heads=2, num_classes=3)
    assert type(vit.blocks[0].attn).__name__ == "Elliptical" and vit(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    lm = unrollattn.build_model("unrollattn_lm_tiny", attention=NAME, n_layer=2, n_embd=32, n_head=2,
                                vocab_size=50).eval()
    ids = torch.randint(1, 50, (2, 6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.generate(ids, use_cache=True, **kw), lm.generate(ids, use_cache=False, **kw))
    code, out, _ = run_cli(capsys, "list", "--kind", "attentions")
    assert code == 0 and any(line.split()[0] == NAME and "decode: recomputes" in line for line in out.splitlines()[1:])


def test_own_attention_in_both_ablations_through_import(own_attention, capsys, tmp_path):
    code, out, err = run_cli(capsys, "ablate", "lm", "--import", own_attention, "--attention", f"{NAME},mhsa",
                             "--block", "aot", "--match-params", "gpt2", "--preset", "tiny_debug",
                             "--out", str(tmp_path / "lm"), "loop.max_steps=2", "loop.eval_every=0")
    assert code == 0, err
    assert f"| {NAME}-aot |" in out and "| mhsa-aot |" in out
    code, out, err = run_cli(capsys, "ablate", "classify", "--import", own_attention, "--attention", NAME,
                             "--block", "transformer", "--preset", "digits_debug", "--out", str(tmp_path / "cls"),
                             "loop.max_steps=2", "loop.eval_every=0", "data.max_test=32", "robust.num_images=0")
    assert code == 0, err
    assert f"| {NAME}-transformer |" in out


def test_own_attention_in_the_lm_benchmark(own_attention, tmp_path):
    __import__(own_attention)
    from benchmarks import lm_throughput

    assert lm_throughput.main(["--variants", f"gpt2,{NAME}-transformer", "--width", "32", "--heads", "2", "--depth",
                               "1", "--seq-len", "16", "--batch", "2", "--repeats", "1", "--no-count-flops",
                               "--out", str(tmp_path)]) in (0, None)
    table = next(tmp_path.glob("lm_throughput_*.md")).read_text()
    assert f"| {NAME}-transformer |" in table


@pytest.mark.slow
def test_the_issue_command_runs_end_to_end(capsys, tmp_path):
    """unrollattn ablate lm --attention mhsa,mssa,glr,bilateral --block aot --match-params gpt2 --seeds 2 (smallest
    preset): 8 runs, one table with mean ± std."""
    code, out, err = run_cli(capsys, "ablate", "lm", "--attention", "mhsa,mssa,glr,bilateral", "--block", "aot",
                             "--match-params", "gpt2", "--seeds", "2", "--preset", "tiny_debug",
                             "--out", str(tmp_path / "abl"))
    assert code == 0, err
    assert all(f"| {a}-aot |" in out for a in ("mhsa", "mssa", "glr", "bilateral")) and " ± " in out
