"""Parameter matching (--match-params): depth first, the nearest width where no depth comes within 2%, for every
registered attention in both recipes, computed on the meta device."""
import pytest

from unrollattn.registry import list_attentions
from unrollattn.utils.params import MATCH_TOLERANCE, matching_shape


def test_depth_first_then_the_nearest_width():
    quadratic = lambda w: w * w  # noqa: E731  (a layer of w^2 parameters)
    assert matching_shape(quadratic, 3 * 64 * 64, width=64, width_step=4) == (3, 64)  # depth alone is exact
    depth, width = matching_shape(quadratic, int(1.5 * 64 * 64), width=64, width_step=4)  # 1 or 2 layers miss by 33%
    assert width != 64 and abs(depth * width * width / (1.5 * 64 * 64) - 1) <= MATCH_TOLERANCE
    assert width % 4 == 0 and 32 <= width <= 128
    assert min((abs(w - 64), w) for w in range(4, 129, 4) if abs(round(1.5 * 4096 / w**2) * w**2 / (1.5 * 4096) - 1)
               <= MATCH_TOLERANCE)[1] == width  # the nearest such width


def test_widths_a_layer_cannot_take_are_skipped_and_bad_arguments_fail():
    def odd_only(w):
        if w % 8 == 0:
            raise ValueError("width must not be a multiple of 8")
        return w * w
    depth, width = matching_shape(odd_only, int(1.5 * 60 * 60), width=60, width_step=4)
    assert width % 8 and abs(depth * width**2 / (1.5 * 3600) - 1) <= MATCH_TOLERANCE
    with pytest.raises(ValueError, match="positive target"):
        matching_shape(odd_only, 0, width=60, width_step=4)


@pytest.mark.parametrize("width, heads, depth", [(32, 2, 1), (64, 4, 2)])
def test_every_registered_attention_matches_gpt2_within_2_percent_in_the_lm(width, heads, depth):
    from unrollattn.recipes import lm

    for label in ("aot_mhsa", "aot_mssa", "crate_alpha", *(f"{a}-aot" for a in list_attentions())):
        mc = lm.ModelConfig(**lm.parse_model_label(label), depth=depth, match_params="gpt2", n_embd=width, n_head=heads)
        target = lm.layer_stack_params(lm.reference_model(mc))[0]
        matched = lm.matched_model(mc)
        assert matched.match_params is None and matched.n_layer >= 1
        assert abs(lm.layer_stack_params(matched)[0] / target - 1) <= MATCH_TOLERANCE, (label, matched)


def test_every_registered_attention_matches_vit_within_2_percent_in_classify():
    from unrollattn.recipes import classify

    size = dict(in_chans=1, img_size=(16, 16))
    for label in ("aot_mssa", "aot_mhsa", "crate", *(f"{a}-aot" for a in list_attentions())):
        mc = classify.ModelConfig(**classify.parse_model_label(label), depth=2, match_params="vit", patch_size=4)
        target = classify.block_stack_params(classify.reference_model(mc), **size)[0]
        matched = classify.matched_model(mc, **size)
        assert abs(classify.block_stack_params(matched, **size)[0] / target - 1) <= MATCH_TOLERANCE, (label, matched)
