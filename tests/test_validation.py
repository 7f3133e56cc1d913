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
