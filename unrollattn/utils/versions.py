"""The dependency ranges unrollattn was written and tested for, read from the installed package's metadata.

``pyproject.toml`` is the one place the ranges live; the dependencies whose internals the code uses (torch, timm,
transformers) carry an upper bound at the newest release CI has passed. Importing the parts that use them warns
when the running release is outside its range, and the test suite fails (``tests/test_versions.py``).
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

PACKAGE = "unrollattn"
INTERNALS_USED = ("torch", "timm", "transformers")


class UnsupportedVersionWarning(UserWarning):
    """A dependency release outside the range unrollattn was written for."""


@lru_cache(maxsize=None)
def declared_requirements() -> dict[str, Requirement]:
    """Name -> requirement of unrollattn's core dependencies (extras excluded); empty when not installed."""
    try:
        lines = metadata.requires(PACKAGE) or []
    except metadata.PackageNotFoundError:
        return {}
    reqs = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            reqs[req.name.lower()] = req
    return reqs


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_problem(name: str, version: str | None = None) -> str | None:
    """Why ``name`` at ``version`` (default: the installed one) is outside the declared range, or None."""
    req = declared_requirements().get(name.lower())
    version = installed_version(name) if version is None else version
    if req is None or version is None:
        return None
    if req.specifier.contains(Version(version), prereleases=True):
        return None
    return (f"{name} {version} is outside the range unrollattn was written and tested for ({name}{req.specifier}); "
            f"install a release in that range (bash install.sh uses constraints.txt for the exact tested set)")


def warn_if_unsupported(*names: str) -> None:
    for name in names:
        problem = version_problem(name)
        if problem:
            warnings.warn(problem, UnsupportedVersionWarning, stacklevel=2)


__all__ = ["INTERNALS_USED", "UnsupportedVersionWarning", "declared_requirements", "installed_version",
           "version_problem", "warn_if_unsupported"]
