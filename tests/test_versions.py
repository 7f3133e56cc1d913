"""Dependency discipline: the releases running the tests are inside the ranges unrollattn declares, the dependencies
whose internals it uses have an upper bound, and constraints.txt (the last green set) agrees with the ranges."""
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from unrollattn.utils import versions

ROOT = Path(__file__).resolve().parents[1]


def test_package_metadata_declares_the_ranges():
    reqs = versions.declared_requirements()
    assert reqs, "unrollattn is not installed (pip install -e .): its declared dependency ranges cannot be read"
    for name in versions.INTERNALS_USED:
        ops = {spec.operator for spec in reqs[name].specifier}
        assert ops & {"<", "<="}, f"{name}: the code uses its internals, so it needs an upper bound, got {reqs[name]}"


@pytest.mark.parametrize("name", versions.INTERNALS_USED)
def test_running_release_is_inside_the_declared_range(name):
    problem = versions.version_problem(name)
    assert problem is None, problem  # names the running release and the range it should be in


def test_a_release_outside_the_range_is_named(monkeypatch):
    assert "transformers 99.0.0 is outside" in versions.version_problem("transformers", "99.0.0")
    monkeypatch.setattr(versions, "installed_version", lambda name: "99.0.0")
    with pytest.warns(versions.UnsupportedVersionWarning, match=r"timm 99\.0\.0 .*timm"):
        versions.warn_if_unsupported("timm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(versions, "installed_version", lambda name: None)
        versions.warn_if_unsupported("timm")  # not installed: nothing to say


def test_constraints_pin_releases_inside_the_ranges():
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = {Requirement(line).name.lower(): Requirement(line) for line in lines if line}
    reqs = versions.declared_requirements()
    for name in (*versions.INTERNALS_USED, "tokenizers", "accelerate"):
        assert name in pins, f"constraints.txt does not pin {name}"
        (spec,) = pins[name].specifier
        assert spec.operator == "==", f"constraints.txt: expected an exact pin for {name}, got {pins[name]}"
        if name in reqs:
            assert reqs[name].specifier.contains(Version(spec.version)), f"{pins[name]} is outside {reqs[name]}"
