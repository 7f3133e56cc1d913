"""result.json is written once, by fit: no recipe rewrites it afterwards, and what a recipe returns is what it holds."""
import json
from pathlib import Path

import pytest

from unrollattn.recipes import classify, icl, lm, restore
from unrollattn.utils.io import to_jsonable


def _lm_overrides(tmp_path: Path) -> list[str]:
    lines = [f"And the {w} went up to the {v} of the {u}." for w in ("king", "people", "servant")
             for v in ("house", "city", "river") for u in ("north", "south", "east", "west")]
    (tmp_path / "train.txt").write_text("\n".join(lines * 12) + "\n", encoding="utf-8")
    return [f"data.corpus=text:{tmp_path}/train.txt", "data.shift_corpus=", "data.val_fraction=0.2",
            "eval.last_word_passages=0", "eval.context_factors=()", "loop.max_steps=2"]


RECIPES = {
    "classify": (classify, "digits_debug", lambda tmp: ["loop.max_steps=2"]),
    "lm": (lm, "tiny_debug", _lm_overrides),
    "icl": (icl, "quick", lambda tmp: ["model.n_embd=32", "model.depth=1", "loop.max_steps=2", "loop.batch_size=8",
                                       "data.eval_prompts=16"]),
    "restore": (restore, "tiny", lambda tmp: ["loop.max_steps=2", "model.variant=uglr"]),
    "restore-baseline": (restore, "tiny", lambda tmp: ["model.variant=bicubic"]),  # fit with loop.max_steps=0
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_result_json_is_written_once_by_fit(recipe, tmp_path, monkeypatch):
    module, preset, overrides = RECIPES[recipe]
    monkeypatch.setenv("UNROLLATTN_DATA", str(tmp_path / "data"))
    written = {}
    real_fit = module.fit

    def fit_then_look(*args, **kwargs):
        summary = real_fit(*args, **kwargs)
        path = Path(summary["run_dir"]) / "result.json"
        written.update(mtime_ns=path.stat().st_mtime_ns, text=path.read_text())
        return summary

    monkeypatch.setattr(module, "fit", fit_then_look)
    cfg = module.load_config(preset, [*overrides(tmp_path), f"loop.out_dir={tmp_path / 'runs'}", "loop.run_name=run",
                                      "loop.device=cpu"])
    summary = module.run(cfg)
    result = tmp_path / "runs" / "run" / "result.json"
    assert written, f"{recipe}.run did not train through fit"
    assert result.stat().st_mtime_ns == written["mtime_ns"] and result.read_text() == written["text"]
    assert json.dumps(json.loads(written["text"]), sort_keys=True) == json.dumps(to_jsonable(summary), sort_keys=True)
