"""torch.compile: every registered model trains as one graph (fullgraph=True: a graph break is an error), and a
compiled model computes what the eager one does. Input checks that need the host (.item()) run in eager mode only."""
import pytest
import torch

import unrollattn
from unrollattn.registry import MODELS, build_model, list_models

TINY_LM = dict(n_layer=2, n_embd=32, n_head=2, n_positions=32)
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=10)
TINY_MODELS = [n for n in list_models() if MODELS.meta(n).get("size") == "tiny"
               and MODELS.meta(n)["task"] in ("causal-lm", "classification")]


def tiny_training_loss(name: str, **overrides):
    """(model, a closure computing a training loss) for registered model ``name`` at a tiny size."""
    torch.manual_seed(0)
    if MODELS.meta(name)["task"] == "causal-lm":
        model = build_model(name, **{**TINY_LM, **overrides})
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        return model, lambda m: m(input_ids=ids, labels=ids).loss
    model = build_model(name, **{**TINY_VIT, **overrides})
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    return model, lambda m: torch.nn.functional.cross_entropy(m(images), labels)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_every_registered_model_trains_as_one_graph(name):
    torch._dynamo.reset()
    model, loss_of = tiny_training_loss(name)
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")  # a graph break raises
    compiled(model).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


GRAPH_ATTENTION_MODELS = [("unrollattn_lm_tiny", {"attention": a, "block": "aot"}) for a in ("glr", "gtv")] + [
    ("vit_unrolled_tiny_patch16_224", {"attention": a, "block": "transformer"}) for a in ("glr", "gtv")]


@pytest.mark.parametrize("name,overrides", GRAPH_ATTENTION_MODELS, ids=lambda v: v if isinstance(v, str) else v["attention"])
def test_graph_attention_models_train_as_one_graph(name, overrides):
    """glr / gtv build their neighbourhood tables without a cache lookup or lazy attribute the tracer breaks on."""
    torch._dynamo.reset()
    model, loss_of = tiny_training_loss(name, **overrides)
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    compiled(model).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["uglr_demosaic", "ugtv_demosaic"])
def test_graph_restoration_models_train_as_one_graph(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(name, blocks=1, iters=2, cg_iters=2, heads=2, width=4)
    x = torch.rand(1, 3, 32, 32)
    y = model.observe(x)
    compiled = torch.compile(lambda m: (m(y) - x).square().mean(), fullgraph=True, backend="aot_eager")
    compiled(model).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow  # inductor code generation: about a minute on 2 cores
def test_a_compiled_model_matches_eager_in_values_and_gradients():
    torch._dynamo.reset()
    model, loss_of = tiny_training_loss("aot_mssa_lm_tiny")
    eager = loss_of(model)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model)  # inductor, the default backend
    loss = loss_of(compiled)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_input_checks_still_run_in_eager_mode():
    model = build_model("unrollattn_lm_tiny", **TINY_LM)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, "):
        model(input_ids=torch.tensor([[1, model.config.vocab_size]]))
