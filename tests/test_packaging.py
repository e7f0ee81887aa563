"""Ponder installed beside the ecosystem (docs/architecture.md#the-map): a wheel holds one top-level
package, `ponder`; Hugging Face's `kernels` (which transformers >= 5.25 imports at load time) and
Ponder's engine live in one process, inside the checkout and outside it; the `ponder` console
script runs a worker started from another directory.
Each of these failed when Ponder's parts were top-level packages (`kernels`, `service`, ...)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import ROOT, make_stack, start_redis, wait_final

# The interpreter's own folder holds the console scripts of its environment (.venv/bin/ponder).
CONSOLE_SCRIPT = Path(sys.executable).parent / "ponder"

# In a fresh interpreter: Hugging Face's kernels, transformers, and Ponder's engine, generating
# greedily with tiny-llama; transformers generates on the same weights as the reference.
BESIDE_HF_KERNELS = """
import importlib.metadata, json
import kernels
from kernels import CUDAProperties
import torch, transformers
from transformers import AutoModelForCausalLM
from ponder import kernels as ponder_kernels
from ponder.engine import SamplingParams
from ponder.engine.runtime import LLM
from ponder.engine.model_store import resolve_model

prompt = [5, 17, 42, 99, 3]
llm = LLM("tiny-llama", kv_cache_memory=64 << 20)
(ours,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
reference = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32).eval()
ids = torch.tensor([prompt])
with torch.inference_mode():
    mask = torch.ones_like(ids)
    out = reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
print(json.dumps({
    "kernels": kernels.__file__,
    "hf_kernels": str(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")),
    "ponder_kernels": ponder_kernels.__file__,
    "transformers": transformers.__version__,
    "ours": ours.outputs[0].token_ids,
    "reference": out[0, len(prompt):].tolist(),
}))
"""


def clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH: nothing but the interpreter's own paths (and the
    working directory, for `python -c`) decides what an import finds."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_hugging_face_kernels_transformers_and_the_engine_share_a_process(where, tmp_path):
    cwd = ROOT if where == "checkout" else tmp_path
    result = subprocess.run(
        [sys.executable, "-c", BESIDE_HF_KERNELS], cwd=cwd, env=clean_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert tuple(int(part) for part in seen["transformers"].split(".")[:2]) >= (5, 25)
    assert seen["kernels"] == seen["hf_kernels"]  # the distribution's own file, not ours
    assert Path(seen["ponder_kernels"]).is_relative_to(ROOT / "ponder" / "kernels")
    assert len(seen["ours"]) == 8 and seen["ours"] == seen["reference"]


def tracked_copy(destination: Path) -> Path:
    """The checkout's tracked files as they are now, copied: a build writes build/ and *.egg-info
    into its source tree, and a test writes nothing into the checkout."""
    names = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    for name in names:
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def test_a_wheel_installs_one_top_level_package(tmp_path):
    target, source = tmp_path / "site", tracked_copy(tmp_path / "source")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {path.name for path in target.iterdir() if not path.name.endswith(".dist-info")}
    assert installed - {"bin"} == {"ponder"}
    assert (target / "bin" / "ponder").is_file()
    # what the CPU kernels compile from at first use travels in the wheel
    shipped = {p.name for p in (target / "ponder" / "kernels" / "cpu").iterdir()}
    assert shipped >= {"extension.cpp", "paged_attention.cpp", "elementwise.cpp", "vec.h"}
    # and the installed package imports on its own, from another directory
    env = {**clean_env(), "PYTHONPATH": str(target)}
    code = "import ponder.engine.config, ponder.service.settings; print(ponder.engine.config.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).is_relative_to(target)


@pytest.fixture
def outside_stack(tmp_path):
    """A stack whose inference worker is the `ponder` console script, started in a directory outside
    the checkout with no PYTHONPATH: the API, its key and the database as usual."""
    redis_url, redis_process = start_redis(tmp_path, db=int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 2)
    stack = make_stack(tmp_path, f"sqlite:///{tmp_path / 'ponder.db'}", redis_url)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stack.start("api")
    stack.start("worker", command=[str(CONSOLE_SCRIPT)], cwd=elsewhere, pythonpath=False)
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop_all()
        if redis_process is not None:
            redis_process.terminate()


def test_the_console_script_worker_runs_a_job_from_another_directory(outside_stack):
    with outside_stack.client() as client:
        response = client.post("/v1/jobs", json={"prompt": "hello", "max_tokens": 6, "temperature": 0})
        assert response.status_code == 202, response.text
        job = wait_final(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["usage"]["completion_tokens"] == 6
    assert "AttributeError" not in outside_stack.log("worker")
