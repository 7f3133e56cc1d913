"""core/validation.py: the shared input and option checks name what they expected."""
import math

import pytest
import torch

from unrollattn.core.validation import check_float, check_images, check_int, check_size_pair, check_tokens


def test_tokens_must_be_floating_point_of_the_parameters_dtype():
    with pytest.raises(ValueError, match="x: expected a floating-point token tensor \\(torch.float32\\), got torch.int64"):
        check_tokens(torch.randint(0, 5, (1, 4, 8)), 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected a floating-point token tensor.*got torch.int64"):
        check_tokens(torch.randint(0, 5, (1, 4, 8)), 8)  # integers are never tokens, even without dtype=
    with pytest.raises(ValueError, match="x: expected dtype torch.float32 \\(the parameters' dtype\\), got torch.float64"):
        check_tokens(torch.randn(1, 4, 8, dtype=torch.float64), 8, dtype=torch.float32)
    check_tokens(torch.randn(1, 4, 8), 8, dtype=torch.float32)
    check_tokens(torch.randn(1, 4, 8, dtype=torch.float64), 8)  # no dtype: any float
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per op: bf16 activations, fp32 parameters
        check_tokens(torch.randn(1, 4, 8, dtype=torch.bfloat16), 8, dtype=torch.float32)
        with pytest.raises(ValueError, match="floating-point"):
            check_tokens(torch.randint(0, 5, (1, 4, 8)), 8, dtype=torch.float32)


def test_images_must_be_a_float_batch():
    with pytest.raises(ValueError, match=r"images: expected a float image tensor \[B, 3, H, W\] \(normalised.*torch.uint8"):
        check_images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"expected an image batch \[B, 3, H, W\], got shape \[3, 8, 8\].*unsqueeze"):
        check_images(torch.zeros(3, 8, 8), 3)
    with pytest.raises(ValueError, match=r"expected an image batch \[B, 3, H, W\], got shape \[2, 1, 8, 8\]"):
        check_images(torch.zeros(2, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="expected dtype torch.float32"):
        check_images(torch.zeros(2, 3, 8, 8, dtype=torch.float64), 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected an image tensor"):
        check_images([[0.0]])
    check_images(torch.zeros(2, 3, 8, 8), 3, dtype=torch.float32)


def test_int_and_float_options():
    assert check_int("n", 3) == 3 and check_int("n", 4.0) == 4 and check_int("n", 0, minimum=0) == 0
    for bad, message in (("abc", "n: expected an integer >= 1, got 'abc' \\(str\\)"), (True, "got True \\(bool\\)"),
                         (2.5, "got 2.5 \\(float\\)"), (0, "n: expected an integer >= 1, got 0"), (None, "NoneType")):
        with pytest.raises(ValueError, match=message):
            check_int("n", bad)
    assert check_float("p", 1) == 1.0 and check_float("p", 0.0, 0.0, 1.0, open_max=True) == 0.0
    for bad, message in (("x", "p: expected a finite number, got 'x' \\(str\\)"), (math.nan, "finite number"),
                         (math.inf, "finite number"), (False, "bool")):
        with pytest.raises(ValueError, match=message):
            check_float("p", bad)
    with pytest.raises(ValueError, match="p: expected a number >= 0.0 and < 1.0, got 1.0"):
        check_float("p", 1.0, 0.0, 1.0, open_max=True)
    with pytest.raises(ValueError, match="p: expected a number > 0.0, got 0.0"):
        check_float("p", 0.0, 0.0, open_min=True)
    assert check_size_pair("patch_size", 16) == (16, 16) and check_size_pair("patch_size", (8, 4)) == (8, 4)
    with pytest.raises(ValueError, match="patch_size: expected an integer >= 1, got 0"):
        check_size_pair("patch_size", 0)
    with pytest.raises(ValueError, match="patch_size: expected an integer >= 1 or an \\(H, W\\) pair"):
        check_size_pair("patch_size", (1, 2, 3))


# ------------------------------------------------------------------------------ the checks where they are used
@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", "abc", "vocab_size: expected an integer >= 1, got 'abc' \\(str\\)"),
    ("n_layer", 2.5, "n_layer: expected an integer >= 1, got 2.5 \\(float\\)"),
    ("n_embd", None, "n_embd: expected an integer >= 1, got None"),
    ("n_positions", 0, "n_positions: expected an integer >= 1, got 0"),
    ("pad_vocab_size_multiple", -64, "pad_vocab_size_multiple: expected an integer >= 1"),
    ("head_dim", "8", "head_dim: expected an integer >= 1, got '8' \\(str\\)"),
    ("dropout", "0.1", "dropout: expected a finite number, got '0.1' \\(str\\)"),
    ("dropout", 1.0, "dropout: expected a number >= 0.0 and < 1.0, got 1.0"),
    ("mlp_ratio", float("nan"), "mlp_ratio: expected a finite number"),
    ("layer_norm_epsilon", 0.0, "layer_norm_epsilon: expected a number > 0.0"),
    ("initializer_range", float("inf"), "initializer_range: expected a finite number"),
    ("eos_token_id", -1, "eos_token_id: expected an integer >= 0, got -1"),
    ("pad_token_id", "0", "pad_token_id: expected an integer >= 0, got '0' \\(str\\)"),
])
def test_lm_config_fields_name_the_field_and_type(field, value, message):
    from unrollattn.language.configuration import UnrollAttnConfig

    with pytest.raises(ValueError, match=message):
        UnrollAttnConfig(**{"n_layer": 1, "n_embd": 16, "n_head": 2, field: value})


def test_lm_config_keeps_valid_values_and_round_trips():
    from unrollattn.language.configuration import UnrollAttnConfig

    cfg = UnrollAttnConfig(n_layer=2.0, n_embd=16, n_head=2, dropout=0, eos_token_id=[3, 4], vocab_size=10)
    assert cfg.n_layer == 2 and isinstance(cfg.n_layer, int) and cfg.dropout == 0.0 and cfg.eos_token_id == [3, 4]
    back = UnrollAttnConfig.from_dict(cfg.to_dict())
    assert (back.n_layer, back.n_embd, back.head_dim, back.vocab_size) == (2, 16, 8, 10)
