"""Evaluation harnesses run against Ponder unmodified (issue 26), on a stack of this module's own
serving SmolLM2-135M:

- lm-evaluation-harness: a multiple-choice task (loglikelihoods: token-id prompts with echo and
  logprobs to /v1/completions) and a generation task, written here as lm-eval task YAML over
  local JSON, run through `local-completions` and `local-chat-completions` and through lm-eval's
  own `hf` model on the same weights (transformers, fp32): the same accuracy, each item's
  loglikelihoods within 1e-3, each greedy generation identical.
- inspect-ai: a task of its own through `openai/<model>` on the Responses API (as it sends it:
  `include: ["reasoning.encrypted_content"]`, `store: false`), directly and in its batch mode
  (/v1/files + /v1/batches), and through the chat-completions provider `openai-api/ponder/<model>`:
  the same greedy completions and scores.

Both run in-process through their Python APIs, offline (no hub: HF_HUB_OFFLINE, the tokenizer
saved from the served GGUF into a directory of the test's own)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from ponder.engine.model_store import resolve_model
from tests.stack import database, make_stack, start_redis

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
# A database of this process's four (tests/conftest.py) that no other module holds while this one
# runs: the session stack's is the base; + 2 is otherwise only taken by single tests of other modules.
REDIS_DB_OFFSET = 2
MULTIPLE_CHOICE = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " Madrid", " Rome"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" seven", " four", " ten", " one"], "answer": 1},
    {"question": "The colour of the clear daytime sky is", "choices": [" green", " red", " blue", " black"], "answer": 2},
    {"question": "Water freezes at zero degrees", "choices": [" Kelvin", " Fahrenheit", " Newton", " Celsius"], "answer": 3},
]
GENERATION = [
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "What is 2 + 3?", "answer": "5"},
    {"question": "Name a primary colour.", "answer": "red"},
]
MAX_GEN_TOKS = 16


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """API, inference worker, batches worker (inspect's batch mode) and beat (which moves batches on)."""
    workdir = tmp_path_factory.mktemp("harness-stack")
    base = int(os.environ.get("PONDER_TEST_REDIS_DB", 13))
    redis_url, redis_process = start_redis(workdir, db=base + REDIS_DB_OFFSET)
    with database("sqlite", workdir) as database_url:
        stack = make_stack(workdir, database_url, redis_url, model=MODEL, maintenance_interval_seconds=1)
        for name in ("api", "worker", "batches-worker", "beat"):
            stack.start(name)
        try:
            stack.wait_ready()
            yield stack
        finally:
            stack.stop_all()
            if redis_process is not None:
                redis_process.terminate()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The served model's tokenizer as a directory transformers' AutoTokenizer reads (what lm-eval's
    `tokenizer=` takes): saved from the GGUF file, no hub."""
    from transformers import AutoTokenizer

    gguf = resolve_model(MODEL)
    directory = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)
    return directory


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def lm_eval_tasks(directory: Path) -> Path:
    """Two lm-eval tasks over local JSON files, as YAML in `directory` (TaskManager's include_path)."""

    def task(name: str, docs: list[dict], **config) -> None:
        data = directory / f"{name}.json"
        data.write_text(json.dumps(docs))
        config = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(directory / "datasets")},
            "test_split": "test",
            "doc_to_target": "answer",
            **config,
        }
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config))

    task(
        "ponder_choice",
        MULTIPLE_CHOICE,
        output_type="multiple_choice",
        doc_to_text="{{question}}",
        doc_to_choice="{{choices}}",
        metric_list=[{"metric": "acc"}],
    )
    task(
        "ponder_generation",
        GENERATION,
        output_type="generate_until",
        doc_to_text="Question: {{question}}\nAnswer:",
        generation_kwargs={"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False, "temperature": 0},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    )
    return directory


def evaluate(model, tasks: list[str], task_dir: Path, **options) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)  # lm-eval's own ~12,000: not indexed
    results = simple_evaluate(
        model, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0, **options
    )
    assert results is not None
    return results


def per_item(results: dict, task: str) -> dict[int, list]:
    return {sample["doc_id"]: sample["resps"] for sample in results["samples"][task]}


def test_lm_eval_local_completions_and_chat_against_its_hf_model(stack, tokenizer_dir, offline, monkeypatch, tmp_path, hf_model):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    monkeypatch.setenv("OPENAI_API_KEY", stack.api_key)
    task_dir = lm_eval_tasks(tmp_path)
    tasks = ["ponder_choice", "ponder_generation"]
    api = {"model": MODEL, "tokenizer_backend": "huggingface", "tokenizer": str(tokenizer_dir)}
    completions = evaluate(
        "local-completions",
        tasks,
        task_dir,
        model_args={**api, "base_url": f"{stack.base_url}/v1/completions", "batch_size": 16, "num_concurrent": 2},
    )
    chat = evaluate(
        "local-chat-completions",
        ["ponder_generation"],
        task_dir,
        model_args={"model": MODEL, "base_url": f"{stack.base_url}/v1/chat/completions", "num_concurrent": 3},
        apply_chat_template=True,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf = HFLM(pretrained=hf_model(MODEL), tokenizer=tokenizer, batch_size=16)
    reference = evaluate(hf, tasks, task_dir)
    chat_reference = evaluate(hf, ["ponder_generation"], task_dir, apply_chat_template=True)

    # multiple choice: the same accuracy, each choice's loglikelihood within 1e-3, the same greedy flags
    ours, theirs = per_item(completions, "ponder_choice"), per_item(reference, "ponder_choice")
    assert completions["results"]["ponder_choice"]["acc,none"] == reference["results"]["ponder_choice"]["acc,none"]
    assert sorted(ours) == sorted(theirs) == list(range(len(MULTIPLE_CHOICE)))
    for doc_id, choices in ours.items():
        for (ll, greedy), (hf_ll, hf_greedy) in zip(choices, theirs[doc_id], strict=True):
            ll, greedy = ll[0] if isinstance(ll, list) else ll, greedy
            assert abs(float(ll) - float(hf_ll)) < 1e-3, (doc_id, ll, hf_ll)
            assert bool(greedy) == bool(hf_greedy), doc_id

    # generation, raw prompts (local-completions) and through the chat template (local-chat-completions)
    for ours, theirs in ((completions, reference), (chat, chat_reference)):
        generated, expected = per_item(ours, "ponder_generation"), per_item(theirs, "ponder_generation")
        assert generated == expected
        assert all(text[0] for text in generated.values()), generated  # each generated something
        assert ours["results"]["ponder_generation"] == theirs["results"]["ponder_generation"]
