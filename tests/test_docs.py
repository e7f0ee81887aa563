"""The documents agree with the code: docs/configuration.md lists every setting once with the
class's default, and every `docs/<name>.md#<anchor>` or `README.md#<anchor>` cited anywhere names a
heading that exists, as does every Markdown link between the documents (code comments cite
sections, and a renamed heading breaks them silently)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from ponder.engine.config import EngineConfig
from ponder.service.settings import ENGINE_DEFAULTS, Settings
from tests.e2e.test_walkthrough import walkthrough_script

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
VARIABLE = re.compile(r"\bPONDER_[A-Z0-9_]*[A-Z0-9]\b")
# A path cited from the repository root (code comments, docs), or a Markdown link relative to its file.
ROOT_CITATION = re.compile(r"(?<![\w/.-])(README\.md|docs/[\w.-]+\.md)#([\w-]+)")
LINK_CITATION = re.compile(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)")
UNSET = (None, "", ())


# -- docs/configuration.md against Settings ----------------------------------------------------


def settings_variables() -> dict[str, tuple[str, ...]]:
    """PONDER_<NAME> -> the attribute path on a Settings object (the engine's fields keep flat names)."""
    variables = {f"PONDER_{name.upper()}": (name,) for name in Settings.model_fields if name != "engine"}
    for field in dataclasses.fields(EngineConfig):
        variables[f"PONDER_{field.name.upper()}"] = ("engine", field.name)
    return variables


def declared_default(path: tuple[str, ...]):
    if path[0] == "engine":
        field = next(f for f in dataclasses.fields(EngineConfig) if f.name == path[1])
        return ENGINE_DEFAULTS.get(field.name, field.default)
    field = Settings.model_fields[path[0]]
    return dataclasses.MISSING if field.default_factory else field.default


def table_cells(line: str) -> list[str]:
    """The cells of a Markdown table row; a `|` inside a code span does not split."""
    cells, cell, in_code = [], "", False
    for char in line.strip().strip("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
    return [*cells, cell.strip()]


def documented_rows(text: str) -> list[tuple[str, str]]:
    """(variable, default cell) of every table row whose first cell is one `PONDER_...` variable."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = table_cells(line)
            match = re.fullmatch(r"`(PONDER_[A-Z0-9_]+)`", cells[0])
            if match and len(cells) >= 3:
                rows.append((match.group(1), cells[1]))
    return rows


def setting(path: tuple[str, ...]):
    """The value at `path` of a Settings built from the environment alone (no .env file)."""
    value = Settings(_env_file=None)
    for name in path:
        value = getattr(value, name)
    return value


@pytest.fixture
def bare_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith("PONDER_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_every_setting_is_documented_once_and_nothing_else_is():
    text = CONFIGURATION.read_text()
    rows = Counter(name for name, _ in documented_rows(text))
    variables = settings_variables()
    assert set(variables) - set(rows) == set(), "settings without a row"
    assert {name: count for name, count in rows.items() if count > 1} == {}, "variables in more than one row"
    # A row for a variable that is no setting: one the code reads itself (os.environ).
    sources = "\n".join(path.read_text() for path in (ROOT / "ponder").rglob("*.py"))
    assert {name for name in set(rows) - set(variables) if f'"{name}"' not in sources} == set()
    assert set(VARIABLE.findall(text)) - set(rows) == set(), "named on the page, but no row"


def test_configuration_shows_the_class_defaults(bare_environment):
    variables = settings_variables()
    wrong = {}
    for name, cell in documented_rows(CONFIGURATION.read_text()):
        if name not in variables:
            continue
        path = variables[name]
        unset = declared_default(path) in UNSET
        if unset or not cell.startswith("`"):
            if not (unset and cell.startswith("unset")):
                wrong[name] = f"{cell!r}: the class's default is {declared_default(path)!r}"
            continue
        # The value shown, set in the environment, must give what the default gives.
        shown = cell[1:].split("`")[0]
        default = setting(path)
        bare_environment.setenv(name, shown)
        if setting(path) != default:
            wrong[name] = f"{shown!r} is not the default {default!r}"
        bare_environment.delenv(name)
    assert wrong == {}


# -- cited anchors ------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercase, punctuation but - and _ dropped,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a Markdown file (outside code fences; repeats get -1, -2, ...)."""
    found: Counter[str] = Counter()
    result, fence = set(), None
    for line in path.read_text().splitlines():
        marker = re.match(r"\s*(```|~~~)", line)
        if marker:
            fence = None if fence == marker.group(1) else fence or marker.group(1)
            continue
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and fence is None:
            base = slug(heading.group(1))
            result.add(f"{base}-{found[base]}" if found[base] else base)
            found[base] += 1
    return result


def tracked_texts() -> dict[Path, str]:
    """Files git tracks, and new ones it does not ignore, that read as text: path -> text."""
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout.split("\n")
    texts = {}
    for path in (ROOT / name for name in names if name):
        if path.is_file() and path.suffix not in (".png", ".json", ".gguf", ".safetensors"):
            try:
                texts[path] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
    return texts


def citations(path: Path, text: str) -> list[tuple[Path, str, int]]:
    """(cited file, anchor, line) for each anchor the file at `path` cites, and (file, "", line) for
    each Markdown link to a file alone."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for target, anchor in ROOT_CITATION.findall(line):
            found.append((ROOT / target, anchor, number))
        if path.suffix == ".md":
            for target, anchor in LINK_CITATION.findall(line):
                if target or anchor:
                    found.append(((path.parent / target).resolve() if target else path, anchor, number))
    return found


def test_slug_follows_github():
    assert slug("Secrets at rest and rotating PONDER_SECRET_KEY") == "secrets-at-rest-and-rotating-ponder_secret_key"
    assert slug("Engine throughput on the CPU (`benchmarks/engine_throughput.py`)") == (
        "engine-throughput-on-the-cpu-benchmarksengine_throughputpy"
    )
    assert slug("Use it from the [OpenAI](https://openai.com) SDK") == "use-it-from-the-openai-sdk"


def test_every_cited_anchor_exists():
    headings: dict[Path, set[str]] = {}
    broken = []
    for path, text in tracked_texts().items():
        for target, anchor, line in citations(path, text):
            where = f"{path.relative_to(ROOT)}:{line}"
            if not target.is_file():
                broken.append(f"{where}: no file {target.relative_to(ROOT)}")
                continue
            if target not in headings:
                headings[target] = anchors(target)
            if anchor and anchor not in headings[target]:
                broken.append(f"{where}: no heading #{anchor} in {target.relative_to(ROOT)}")
    assert broken == []


# A source file named in prose or a comment: ponder/service/job_rules.py, tests/stack.py, ...
SOURCE_CITATION = re.compile(
    r"(?<![\w/.-])((?:ponder|tests|benchmarks|migrations|docker)/[\w/.-]*\w\.(?:py|yml|yaml|md))\b"
)


def test_every_cited_source_file_exists():
    """A file moved or renamed takes its citations with it (the map, comments, docstrings)."""
    broken = [
        f"{path.relative_to(ROOT)}:{number}: no file {cited}"
        for path, text in tracked_texts().items()
        for number, line in enumerate(text.splitlines(), start=1)
        for cited in SOURCE_CITATION.findall(line)
        if not (ROOT / cited).exists()
    ]
    assert broken == []


def test_the_readme_walkthrough_is_one_block_bash_can_parse():
    # tests/e2e/test_walkthrough.py runs it against a real stack; this catches a broken edit in seconds.
    subprocess.run(["bash", "-n"], input=walkthrough_script(), text=True, check=True)
