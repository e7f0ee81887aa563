"""benchmarks/kernels_gpu.py end to end: `--smoke` on CPU under TRITON_INTERPRET=1 at toy shapes (in
`make test`), and the full R1-shape run on a GPU (marked `gpu`, skipped without CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernels_gpu.py"
KERNELS = (
    "fp8_quant",
    "fp8_gemm",
    "kv_store",
    "paged_decode",
    "mla_decode",
    "prefill",
    "mla_prefill",
    "grouped_topk",
    "fused_moe",
    "decode_step",
)


def _run(args: list[str], timeout: float) -> tuple[int, str, list[dict[str, str]]]:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            rows.append(dict(field.split("=", 1) for field in line.split()[1:]))
    return proc.returncode, output, rows


def _check_rows(rc: int, output: str, rows: list[dict[str, str]]) -> None:
    assert rows, f"no RESULT lines:\n{output[-4000:]}"
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert last.startswith("RESULT "), f"the last line is not a RESULT row: {last!r}"
    for kernel in KERNELS:
        assert any(row["kernel"] == kernel for row in rows), f"no RESULT row for {kernel}:\n{output[-4000:]}"
    failed = [row for row in rows if row.get("status") != "ok"]
    assert not failed, f"failed rows: {failed}\n{output[-4000:]}"
    assert rc == 0, f"exit code {rc}:\n{output[-4000:]}"
    for row in rows:
        if row["kernel"] == "decode_step" and row["status"] == "ok":
            assert float(row["projected_tok_s"]) > 0


def test_smoke_runs_end_to_end_on_cpu():
    rc, output, rows = _run(["--smoke"], timeout=600)  # a bound for a hung run, not a speed target
    _check_rows(rc, output, rows)
    assert "CEILING copy_gbps=" in output


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_r1_shapes_on_gpu():
    rc, output, rows = _run([], timeout=1800)
    _check_rows(rc, output, rows)
