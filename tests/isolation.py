"""What a fresh interpreter has imported after importing one module: the API and the webhooks
worker must not drag in torch, the engine or the inference tasks."""

from __future__ import annotations

import subprocess
import sys


def modules_imported_with(module: str, candidates: tuple[str, ...]) -> str:
    """The candidates in sys.modules after `import module`, printed as a sorted list."""
    code = f"import sys, {module}\nprint(sorted(m for m in {candidates!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
