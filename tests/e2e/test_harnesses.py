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
transformers converted from the served GGUF file, in the model cache)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from tests.references import reference_dir
from tests.stack import database, make_stack, start_redis

pytestmark = [
    pytest.mark.slow,
    # inspect-ai 0.3.285's retry policy calls tenacity's wait_exponential_jitter the old way
    pytest.mark.filterwarnings("ignore:The 'initial' parameter is deprecated:DeprecationWarning"),
]

MODEL = "smollm2-135m"
# A database of this process's four (tests/conftest.py) that no other module holds while this one
# runs: the session stack's is the base; + 2 is otherwise only taken by single tests of other modules.
REDIS_DB_OFFSET = 2
MULTIPLE_CHOICE = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " Madrid", " Rome"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" seven", " four", " ten", " one"], "answer": 1},
    {
        "question": "The colour of the clear daytime sky is",
        "choices": [" green", " red", " blue", " black"],
        "answer": 2,
    },
    {
        "question": "Water freezes at zero degrees",
        "choices": [" Kelvin", " Fahrenheit", " Newton", " Celsius"],
        "answer": 3,
    },
]
GENERATION = [
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "What is 2 + 3?", "answer": "5"},
    {
        "question": "Count from one to ten in words.",
        "answer": "one, two, three, four, five, six, seven, eight, nine, ten",
    },
]
MAX_GEN_TOKS = 16


@pytest.fixture(scope="module")
def harness_stack(tmp_path_factory):
    """API, inference worker, batches worker (inspect's batch mode) and beat (which moves batches
    on), started but not waited for: a test waits (the first one after loading transformers'
    reference, while the stack starts)."""
    workdir = tmp_path_factory.mktemp("harness-stack")
    base = int(os.environ.get("PONDER_TEST_REDIS_DB", 13))
    redis_url, redis_process = start_redis(workdir, db=base + REDIS_DB_OFFSET)
    with database("sqlite", workdir) as database_url:
        stack = make_stack(workdir, database_url, redis_url, model=MODEL, maintenance_interval_seconds=1)
        for name in ("api", "worker", "batches-worker", "beat"):
            stack.start(name)
        try:
            yield stack
        finally:
            stack.stop_all()
            if redis_process is not None:
                redis_process.terminate()


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub, for the harnesses, datasets and transformers: everything here is a local file."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            patch.setenv(name, "1")
        yield


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    """The served model's tokenizer as a directory transformers' AutoTokenizer reads (what lm-eval's
    `tokenizer=` takes): transformers' form of the GGUF file, converted once per model cache
    (tests/references.py), beside the weights `hf_model` loads."""
    return reference_dir(MODEL)


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
        doc_to_choice="choices",
        metric_list=[{"metric": "acc"}],
    )
    task(
        "ponder_generation",
        GENERATION,
        output_type="generate_until",
        doc_to_text="Question: What is the capital of Italy?\nAnswer: Rome\nQuestion: {{question}}\nAnswer:",
        generation_kwargs={"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False, "temperature": 0},
        metric_list=[
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "regexes_to_ignore": ["^ +", "\\.$"],
            }
        ],
    )
    return directory


def evaluate(model, tasks: list[str], task_dir: Path, **options) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)  # not its own 14,000 (7 s to index)
    results = simple_evaluate(model, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0, **options)
    assert results is not None
    return results


def per_item(results: dict, task: str) -> dict[int, list]:
    """doc_id -> its responses: (loglikelihood, is_greedy) per choice, or the generated text."""
    return {sample["doc_id"]: sample["filtered_resps"] for sample in results["samples"][task]}


def test_lm_eval_local_completions_and_chat_against_its_hf_model(
    harness_stack, tokenizer_dir, monkeypatch, tmp_path, hf_model
):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    stack = harness_stack
    # lm-eval's own model on transformers' reference, while the stack starts
    hf = HFLM(pretrained=hf_model(MODEL), tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), batch_size=16)
    task_dir = lm_eval_tasks(tmp_path)
    tasks = ["ponder_choice", "ponder_generation"]
    reference = evaluate(hf, tasks, task_dir)
    chat_reference = evaluate(hf, ["ponder_generation"], task_dir, apply_chat_template=True)

    stack.wait_ready()
    monkeypatch.setenv("OPENAI_API_KEY", stack.api_key)
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

    # multiple choice: the same accuracy, each choice's loglikelihood within 1e-3, the same greedy flags
    assert completions["results"]["ponder_choice"]["acc,none"] == reference["results"]["ponder_choice"]["acc,none"]
    ours, theirs = per_item(completions, "ponder_choice"), per_item(reference, "ponder_choice")
    assert sorted(ours) == sorted(theirs) == list(range(len(MULTIPLE_CHOICE)))
    for doc_id, choices in ours.items():
        assert len(choices) == len(theirs[doc_id]) == 4
        for (loglikelihood, greedy), (expected, expected_greedy) in zip(choices, theirs[doc_id], strict=True):
            assert abs(loglikelihood - expected) < 1e-3, (doc_id, loglikelihood, expected)
            assert greedy == expected_greedy, doc_id

    # generation, raw prompts (local-completions) and through the chat template (local-chat-completions)
    for served, local in ((completions, reference), (chat, chat_reference)):
        generated, expected = per_item(served, "ponder_generation"), per_item(local, "ponder_generation")
        assert generated == expected
        assert all(texts[0] for texts in generated.values()), generated  # each generated something
        assert served["results"]["ponder_generation"] == local["results"]["ponder_generation"]


@pytest.fixture
def inspect_isolated(monkeypatch, tmp_path):
    """inspect loads a .env file from the working directory up (a checkout's would reach this
    process's environment) and puts its log handler on the root logger for good: neither outlives
    the test."""
    monkeypatch.chdir(tmp_path)
    loggers = [logging.getLogger(name) for name in ("", "httpx", "httpx2")]
    saved = [(logger, list(logger.handlers), logger.level) for logger in loggers]
    yield
    for logger, handlers, level in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def inspect_run(model: str, log_dir: Path, **options):
    """inspect-ai's eval of a task of our own: three questions, greedy, 16 tokens, `includes`."""
    from inspect_ai import Task
    from inspect_ai import eval as inspect_eval
    from inspect_ai.dataset import Sample
    from inspect_ai.scorer import includes
    from inspect_ai.solver import generate

    samples = [Sample(input=doc["question"], target=doc["answer"], id=i) for i, doc in enumerate(GENERATION)]
    task = Task(dataset=samples, solver=generate(), scorer=includes(), name="ponder_questions")
    (log,) = inspect_eval(
        task, model=model, temperature=0, max_tokens=MAX_GEN_TOKS, log_dir=str(log_dir), display="none", **options
    )
    assert log.status == "success", log.error
    return log


def model_requests(log) -> list[dict]:
    return [event.call.request for sample in log.samples for event in sample.events if event.event == "model"]


def test_inspect_ai_through_responses_its_batch_mode_and_chat_completions(
    harness_stack, inspect_isolated, monkeypatch, tmp_path
):
    from inspect_ai.model import BatchConfig

    stack = harness_stack
    stack.wait_ready()
    for prefix in ("OPENAI", "PONDER"):  # openai/<model>, and openai-api/ponder/<model>
        monkeypatch.setenv(f"{prefix}_BASE_URL", f"{stack.base_url}/v1")
        monkeypatch.setenv(f"{prefix}_API_KEY", stack.api_key)

    responses = inspect_run(f"openai/{MODEL}", tmp_path / "responses")
    # a batch as soon as all three are queued, checked every half second (inspect's defaults: 15 s)
    batched = inspect_run(f"openai/{MODEL}", tmp_path / "batch", batch=BatchConfig(size=3, send_delay=1, tick=0.5))
    chat = inspect_run(f"openai-api/ponder/{MODEL}", tmp_path / "chat")

    # what each sent: the Responses API as OpenAI's provider sends it, chat completions
    for request in model_requests(responses) + model_requests(batched):
        assert request["include"] == ["reasoning.encrypted_content"] and request["store"] is False, request
        assert "input" in request and request["temperature"] == 0, request
    assert all("messages" in request for request in model_requests(chat))
    with stack.client() as client:
        (batch,) = client.get("/v1/batches").json()["data"]
    assert batch["endpoint"] == "/v1/responses" and batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": len(GENERATION), "completed": len(GENERATION), "failed": 0}

    # the same greedy completions, scores and accuracy every way
    def outcome(log) -> dict:
        return {sample.id: (sample.output.completion, sample.scores["includes"].value) for sample in log.samples}

    assert outcome(responses) == outcome(batched) == outcome(chat)
    assert all(completion for completion, _ in outcome(chat).values())
    accuracy = {log.results.scores[0].metrics["accuracy"].value for log in (responses, batched, chat)}
    assert len(accuracy) == 1, accuracy
