"""The layout's rules, checked on the source (docs/architecture.md, "The map"): one import package,
`ponder`, whose name no other distribution uses; imports run one way between its subpackages, as
the map's picture draws them, with no import cycle (imports inside functions count); the domain
(ponder.service) imports no web framework and the workers no HTTP module; the engine's top level
imports no torch; settings are read at the entry points and passed on; no module reaches 400 lines;
the CLI is its own package; and the repository cites no document outside itself."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "ponder"
PACKAGES = ("api", "cli", "engine", "kernels", "service", "workers")  # the subpackages of ponder
WEB_FRAMEWORKS = ("fastapi", "starlette", "uvicorn")
MAX_MODULE_LINES = 400  # the largest module of the project stays under this
# The engine's torch runtime (a subpackage); the modules at ponder/engine/ itself are its torch-free
# part, which the API process imports, and ponder/engine/tools/ holds the tools.
ENGINE_RUNTIME = f"{PROJECT}.engine.runtime"
TORCH = ("torch", "triton", f"{PROJECT}.kernels", ENGINE_RUNTIME)  # what the torch-free part never loads
MAX_MODEL_RUNNER_LINES = 300  # plan -> tensors -> forward -> sample, as nano-vllm's (257 lines)
# The commands `ponder --help` lists: those from before the CLI became its own package, and since.
COMMANDS = ("models", "keys", "db", "jobs", "api", "worker", "webhooks-worker", "beat", "flower", "up", "submit")
COMMANDS += ("secrets", "batches-worker")


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
    return sorted((ROOT / PROJECT / package).rglob("*.py"))


def subpackage(module: str) -> str | None:
    """`ponder.engine.runtime.llm` -> "engine"; None for a module outside the project."""
    parts = module.split(".")
    return parts[1] if parts[0] == PROJECT and len(parts) > 1 else None


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
    inside_a_function = "def f():\n    from ponder.engine.model_store import resolve_model\n    from . import tiny\n"
    names = modules_named(inside_a_function, "ponder.engine")
    assert {"ponder.engine.model_store", "ponder.engine.tiny"} <= names


def test_no_import_cycle_inside_the_engine():
    assert find_cycle(import_graph("engine")) is None


def torch_free_engine() -> list[Path]:
    """The torch-free part of the engine: the modules at ponder/engine/ itself (not its subpackages)."""
    return sorted((ROOT / PROJECT / "engine").glob("*.py"))


def test_the_torch_free_engine_imports_no_torch():
    """Torch-free by construction: no module at ponder/engine/ imports torch, Triton, the kernels or
    the engine's runtime, at any depth (imports inside functions count)."""
    assert imports_in(torch_free_engine(), lambda m: within(m, TORCH)) == {}


def test_importing_the_torch_free_engine_and_the_tools_loads_no_torch():
    """A fresh interpreter that imports every torch-free engine module and every tool (a tool may
    load torch inside a call: making a tiny model's weights) has loaded none of TORCH."""
    modules = sorted(module_name(path) for path in [*torch_free_engine(), *sources("engine/tools")])
    assert loaded_after_importing(modules, TORCH) == []


def test_the_model_runner_only_runs_the_model():
    """Rank processes, KV-cache sizing, the MTP drafter and the seeded noise have modules of their own."""
    runner = ROOT / PROJECT / "engine" / "runtime" / "model_runner.py"
    assert len(runner.read_text(encoding="utf-8").splitlines()) < MAX_MODEL_RUNNER_LINES


def test_no_import_cycle_in_the_whole_project():
    assert find_cycle(import_graph("")) is None


def imports_of(package: str, forbidden) -> dict[str, list[str]]:
    """File -> the modules it imports (at any depth) for which `forbidden(module)` holds."""
    return imports_in(sources(package), forbidden)


def imports_in(paths: list[Path], forbidden) -> dict[str, list[str]]:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if forbidden(m)) for path in paths
    }
    return {path: names for path, names in offenders.items() if names}


def within(module: str, names) -> bool:
    """`module` is one of `names` or inside one of them (`torch.nn` is within "torch")."""
    return any(module == name or module.startswith(f"{name}.") for name in names)


def loaded_after_importing(modules: list[str], names) -> list[str]:
    """The modules within `names` that a fresh interpreter has loaded once it imported `modules`:
    what an ast check cannot see (a dependency's own imports)."""
    code = f"import importlib, json, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
    result = subprocess.run(
        [sys.executable, "-c", code + "print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return [module for module in json.loads(result.stdout) if within(module, names)]


def test_the_service_domain_knows_nothing_above_it():
    """The domain (ponder.service) knows nothing of the HTTP layer, the processes that consume its
    queue, the CLI above it, nor of any web framework: its rules raise domain errors
    (ponder/service/errors.py), and the HTTP layer maps them."""
    assert imports_of("service", lambda m: subpackage(m) in ("api", "workers", "cli")) == {}
    assert imports_of("service", lambda m: m.split(".")[0] in WEB_FRAMEWORKS) == {}


def test_the_http_layer_never_imports_workers_or_the_cli():
    assert imports_of("api", lambda m: subpackage(m) in ("workers", "cli")) == {}


def test_workers_import_no_http_module():
    assert imports_of("workers", lambda m: subpackage(m) == "api" or m.split(".")[0] in WEB_FRAMEWORKS) == {}


def test_importing_every_worker_module_loads_no_web_framework():
    """A fresh interpreter that imports every module of ponder.workers has loaded neither FastAPI nor
    Starlette."""
    assert loaded_after_importing(sorted(module_name(path) for path in sources("workers")), WEB_FRAMEWORKS) == []


# Where a process reads its settings from the environment (get_settings()): its entry points, which
# pass them on. The two process-wide objects that have no caller to take them from read them too:
# Celery's sending app (ponder/service/queue.py celery_client) and the secret box of the encrypted
# column type (ponder/service/encryption.py), which SQLAlchemy calls.
SETTINGS_READERS = (
    "ponder/api/app.py",  # create_app(), the app factory
    "ponder/cli/",  # each command
    "ponder/workers/celery_app.py",  # Celery finds the worker's app at import
    "ponder/workers/startup.py",
    "ponder/workers/tasks.py",
    "ponder/workers/maintenance_tasks.py",
    "ponder/workers/webhook_tasks.py",
    "ponder/workers/batch_tasks.py",
    "ponder/service/queue.py",
    "ponder/service/encryption.py",
)


def settings_readers() -> set[str]:
    """Files that call get_settings()."""
    calls = set()
    for path in sources(""):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "get_settings"
            ):
                calls.add(str(path.relative_to(ROOT)))
    return calls


def test_settings_are_read_at_the_entry_points_and_passed_on():
    """The domain, the routes and the worker's plain functions take the settings they use; an SQL
    engine or a Redis client is the one of the settings given (ponder/service/db.py sql_engine)."""
    readers = settings_readers()
    assert "ponder/cli/admin.py" in readers  # the finder finds
    assert {path for path in readers if not path.startswith(SETTINGS_READERS)} == set()


def test_every_module_is_under_the_size_limit():
    lengths = {str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines()) for path in sources("")}
    assert {path: n for path, n in lengths.items() if n >= MAX_MODULE_LINES} == {}


def test_the_engine_and_kernels_know_nothing_of_the_service():
    for package in ("engine", "kernels"):
        for path in sources(package):
            above = {m for m in imported_modules(path) if subpackage(m) in ("api", "service", "workers", "cli")}
            assert not above, f"{path.relative_to(ROOT)} imports {sorted(above)}"


def test_the_cli_is_its_own_package_with_every_command():
    assert (ROOT / PROJECT / "cli" / "main.py").is_file() and not (ROOT / PROJECT / "service" / "cli.py").exists()
    result = subprocess.run(
        [sys.executable, "-m", "ponder", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"^│ ([a-z][a-z-]+) ", result.stdout, flags=re.MULTILINE))
    assert listed == set(COMMANDS)


def root_import_names() -> set[str]:
    """What `import NAME` finds at the repository root when the root is on sys.path (pytest, `python
    -m ponder`): regular packages and modules. A folder without __init__.py (benchmarks/, migrations/)
    is at most a namespace package, which never hides a regular package found later on the path."""
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    return packages | {path.stem for path in ROOT.glob("*.py")}


def test_the_root_offers_one_import_package_and_the_tests():
    assert root_import_names() == {PROJECT, "tests"}
    assert {path.parent.name for path in (ROOT / PROJECT).glob("*/__init__.py")} == set(PACKAGES)


def test_no_installed_distribution_provides_a_name_the_root_offers():
    """Hugging Face's `kernels` (which transformers >= 5.25 imports) once lost to our own top-level
    kernels/ whenever the checkout was on sys.path: no other distribution may own one of our names."""
    owners = importlib.metadata.packages_distributions()
    clashes = {name: owners[name] for name in root_import_names() if set(owners.get(name, [])) - {PROJECT}}
    assert clashes == {}


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


# The parts of the picture in docs/architecture.md ("The map"): a subpackage, or one of the
# engine's own folders (its torch-free top level is `engine`).
ENGINE_FOLDERS = ("runtime", "tools")


def picture_part(module: str) -> str | None:
    parts = module.split(".")
    if subpackage(module) is None or parts[1] not in PACKAGES:
        return None
    if parts[1] == "engine" and len(parts) > 2 and parts[2] in ENGINE_FOLDERS:
        return f"engine_{parts[2]}"
    return parts[1]


def pictured_imports() -> tuple[set[str], set[tuple[str, str]]]:
    """The Mermaid flowchart's nodes and arrows (`a --> b`)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    chart = re.search(r"```mermaid\n(.*?)```", text, flags=re.DOTALL)
    assert chart, "docs/architecture.md has no Mermaid picture"
    nodes = set(re.findall(r"^\s*(\w+)\[", chart.group(1), flags=re.MULTILINE))
    arrows = set(re.findall(r"^\s*(\w+) --> (\w+)\s*$", chart.group(1), flags=re.MULTILINE))
    return nodes, arrows


def test_the_architecture_picture_matches_the_imports():
    """Every part of the project is a node, and the arrows are exactly the imports between parts."""
    modules = {module_name(path): path for path in sources("")}
    imports = {
        (picture_part(name), picture_part(target))
        for name, path in modules.items()
        for target in imported_modules(path) & modules.keys()
        if None not in (picture_part(name), picture_part(target)) and picture_part(name) != picture_part(target)
    }
    nodes, arrows = pictured_imports()
    assert nodes == {picture_part(name) for name in modules} - {None}
    assert arrows == imports
