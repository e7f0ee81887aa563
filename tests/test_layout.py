"""The layout's rules, checked on the source (docs/architecture.md, "The map"): imports run one way
between the packages, the engine has no import cycle (imports inside functions count), the CLI is
its own package, and the repository cites no document outside itself."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "engine", "kernels", "service", "workers")
# The commands `ponder --help` lists: those from before the CLI became its own package, and since.
COMMANDS = ("models", "keys", "db", "jobs", "api", "worker", "webhooks-worker", "beat", "flower", "up", "submit")
COMMANDS += ("secrets",)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in the file names, at any depth (functions included)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return modules_named(path.read_text(encoding="utf-8"), package)


def modules_named(source: str, package: str) -> set[str]:
    """`import a.b` names a.b; `from a import b` names a and a.b (b may be a module); relative
    imports are resolved against `package`."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (only names that are modules)."""
    modules = {module_name(path): path for path in sources(package)}
    graph = {}
    for name, path in modules.items():
        targets = {m for m in imported_modules(path) if m in modules and m != name}
        graph[name] = targets - set(_parents(name))  # a package's own __init__ runs first anyway
    return graph


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_sees_imports_inside_functions():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    inside_a_function = "def f():\n    from engine.model_store import resolve_model\n    from . import tiny\n"
    assert {"engine.model_store", "engine.tiny"} <= modules_named(inside_a_function, "engine")


def test_no_import_cycle_inside_the_engine():
    assert find_cycle(import_graph("engine")) is None


def test_service_never_imports_workers_or_the_cli():
    """The API side knows nothing of the processes that consume its queue, nor of the CLI above it."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] in ("workers", "cli"))
        for path in sources("service")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_engine_and_kernels_know_nothing_of_the_service():
    for package in ("engine", "kernels"):
        for path in sources(package):
            above = {m for m in imported_modules(path) if m.split(".")[0] in ("service", "workers", "cli")}
            assert not above, f"{path.relative_to(ROOT)} imports {sorted(above)}"


def test_the_cli_is_its_own_package_with_every_command():
    assert (ROOT / "cli" / "main.py").is_file() and not (ROOT / "service" / "cli.py").exists()
    result = subprocess.run(
        [sys.executable, "-m", "cli", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"^│ ([a-z][a-z-]+) ", result.stdout, flags=re.MULTILINE))
    assert listed == set(COMMANDS)


def test_no_file_cites_a_document_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    pattern = re.compile(r"\.\./shared/|DESIGN(\.md| §)")
    texts = [name for name in tracked if Path(name).suffix in (".py", ".md", ".yaml", ".yml", ".toml", "")]
    offenders = [name for name in texts if (ROOT / name).is_file() and pattern.search(_read(ROOT / name))]
    assert offenders == []


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""
