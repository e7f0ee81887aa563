"""CPU kernels in C++ (built on first use with torch's extension builder).

On the CPU the torch reference pays for gathering every context out of the paged cache and for
padding to the longest sequence; these kernels read the cache in place. If the build is not
possible (no compiler), `load()` returns None and the reference serves instead.
"""

from __future__ import annotations

import fcntl
import logging
import os
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger("ponder.kernels")
SOURCES = [Path(__file__).with_name("extension.cpp")]  # it includes the kernels' sources: one unit


def _build_fingerprint() -> str:
    """The build name carries the CPU's flags (-march=native code must never run on another CPU)
    and every source and header (torch's own rebuild check does not look at headers)."""
    import hashlib

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    digest = hashlib.sha256(flags.encode())
    for path in sorted(Path(__file__).parent.glob("*.[ch]*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def extension_name() -> str:
    return f"ponder_cpu_kernels_{_build_fingerprint()}"


def build_directory() -> Path:
    """Where the extension is built: TORCH_EXTENSIONS_DIR (as torch reads it) or torch's cache, / its name."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / extension_name()


@lru_cache(maxsize=1)
def load():
    if os.environ.get("PONDER_CPU_KERNELS", "1") == "0":
        return None
    try:
        import ninja  # the PyPI package ships the binary; the builder looks for it on PATH
        from torch.utils.cpp_extension import load as build

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        with _only_builder(directory):
            return build(
                name=extension_name(),
                sources=[str(s) for s in SOURCES],
                # -fopenmp: at::parallel_for is inline and runs serially without it
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                verbose=False,
            )
    except Exception as e:  # no compiler, no ninja: the reference still works
        logger.warning("CPU kernels unavailable, using the torch reference: %s", e)
        return None


class _only_builder:
    """The one process building in `directory` (an OS lock: the kernel drops it when its holder
    dies). torch's own lock is a file that a builder killed mid-build leaves behind, after which
    every later load waits for it forever; under this lock no other builder is alive, so such a
    file is stale and goes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __enter__(self) -> None:
        self.file = open(self.directory / "ponder-builder.lock", "w")  # noqa: SIM115 (held until __exit__)
        fcntl.flock(self.file, fcntl.LOCK_EX)
        stale = self.directory / "lock"  # torch's FileBaton
        if stale.exists():
            logger.warning("removing %s, left by a build that did not finish", stale)
            stale.unlink(missing_ok=True)

    def __exit__(self, *_) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
