"""The lock file (requirements-lock.txt, written by `make lock` with pip-tools): what it pins, and
how far an environment has moved from it. `python -m tests.lock requirements-lock.txt` prints each
installed distribution whose version differs from the lock (the canary, `make test-latest`)."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import sysconfig
from pathlib import Path

from packaging.utils import canonicalize_name

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def locked_versions(path: Path) -> dict[str, str]:
    """Canonical name -> pinned version, for every `name==version` line."""
    pins = (PIN.match(line) for line in path.read_text().splitlines())
    return {canonicalize_name(match[1]): match[2] for match in pins if match}


def installed_versions() -> dict[str, str]:
    """What the environment's site-packages hold (not what else is on sys.path: setuptools puts
    its vendored copies there once imported, torch's extension builder imports it)."""
    folders = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    found = importlib.metadata.distributions(path=folders)
    return {canonicalize_name(d.metadata["Name"]): d.version for d in found}


def drift(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per locked distribution installed at another version, or not installed."""
    lines = []
    for name, version in sorted(locked.items()):
        now = installed.get(name)
        if now != version:
            lines.append(f"{name}: locked {version}, installed {now or 'nothing'}")
    return lines


if __name__ == "__main__":
    changes = drift(locked_versions(Path(sys.argv[1])), installed_versions())
    print(f"{len(changes)} distributions differ from {sys.argv[1]}:", *changes, sep="\n  ")
