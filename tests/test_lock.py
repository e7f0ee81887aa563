"""The lock (requirements-lock.txt, `make lock`): it pins every dependency pyproject.toml names, and
the environment the suite runs in has exactly its versions. Not part of the canary (`make
test-latest` installs the newest releases instead, on purpose)."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.lock import drift, installed_versions, locked_versions
from tests.stack import ROOT

LOCK = ROOT / "requirements-lock.txt"


def test_the_lock_pins_every_dependency_pyproject_names():
    """`make install` constrains every requirement of the package and of its engine and dev extras
    (torch excepted: the Makefile pins its CPU build); a dependency added without `make lock` fails here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["engine"]]
    wanted += project["optional-dependencies"]["dev"]
    locked = locked_versions(LOCK)
    unpinned = []
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        if name != "torch" and not requirement.specifier.contains(locked.get(name, "0.dev0"), prereleases=True):
            unpinned.append(f"{requirement} (locked: {locked.get(name)})")
    assert unpinned == []


def test_a_fresh_install_has_the_locked_versions():
    """What this suite runs with is what the lock says (`make install` installs with `-c` the lock)."""
    assert drift(locked_versions(LOCK), installed_versions()) == []
