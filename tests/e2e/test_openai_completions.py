"""POST /v1/completions (OpenAI's legacy completions, as lm-evaluation-harness calls them) through
the official `openai` SDK against the real stack: a prompt scored alone (`echo`, `logprobs`,
`max_tokens: 0`) with the engine's own values, token-id prompts in one request (each a job),
streamed chunks that say what the waited answer says, a batch of completion lines, and the
parameters it refuses."""

from __future__ import annotations

import json

import openai
import pytest

from ponder.engine import SamplingParams
from ponder.service.prompts import prompt_token_ids
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from tests.e2e.test_openai_batch import file_lines, run_batch, wait_batch
from tests.stack import SQLITE_ONLY

pytestmark = SQLITE_ONLY  # nothing here depends on the database (tests/stack.py)

MODEL = "tiny-llama"
PROMPT = "The sky is blue because"


def token_ids(prompt: str) -> list[int]:
    return prompt_token_ids(JobCreate(prompt=prompt), Settings(model=MODEL, _env_file=None))


def test_echo_scores_the_prompt_with_the_engines_own_values(stack, sdk, make_llm):
    scored = sdk.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0, temperature=0)
    (choice,) = scored.choices
    assert scored.object == "text_completion" and choice.text == PROMPT and choice.finish_reason == "length"
    ids = token_ids(PROMPT)
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(ids), 0)
    shown = choice.logprobs
    assert len(shown.tokens) == len(ids) and shown.token_logprobs[0] is None and shown.top_logprobs[0] is None
    assert shown.text_offset == [sum(len(t) for t in shown.tokens[:i]) for i in range(len(ids))]

    llm = make_llm(MODEL, max_num_seqs=8)
    (offline,) = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))
    for i, value in enumerate(offline.prompt_logprobs[1:], start=1):
        assert shown.token_logprobs[i] == pytest.approx(value.logprob, abs=1e-4)
        alternatives = {llm.tokenizer.token_bytes(token).decode(errors="backslashreplace") for token, _ in value.top}
        assert alternatives | {shown.tokens[i]} == set(shown.top_logprobs[i])  # the token itself too

    # lm-eval's loglikelihood request: token ids, several prompts in one request, one token each
    prompts = [ids, token_ids("Water boils at")]
    request = {"model": MODEL, "prompt": prompts, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    raw = sdk.completions.with_raw_response.create(**request)
    both, job_ids = raw.parse(), raw.headers["x-ponder-job-ids"].split(",")
    assert [c.index for c in both.choices] == [0, 1] and len(job_ids) == 2
    assert both.choices[0].logprobs.token_logprobs[1:-1] == shown.token_logprobs[1:]  # the same prompt, the same values
    with stack.client() as client:
        jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
    assert [job["usage"]["prompt_tokens"] for job in jobs] == [len(p) for p in prompts]
    assert [len(c.logprobs.tokens) for c in both.choices] == [len(p) + 1 for p in prompts]
    assert both.usage.completion_tokens == 2


def test_streamed_chunks_say_what_the_waited_answer_says(sdk):
    request = {"model": MODEL, "prompt": [PROMPT, "Once upon a time"], "max_tokens": 10, "temperature": 0}
    request |= {"logprobs": 2, "echo": True, "seed": 1}
    waited = sdk.completions.create(**request)
    streamed: dict[int, dict] = {}
    chunks = list(sdk.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        for choice in chunk.choices:
            seen = streamed.setdefault(choice.index, {"text": "", "tokens": [], "values": [], "finish": None})
            seen["text"] += choice.text
            if choice.logprobs is not None:
                seen["tokens"] += choice.logprobs.tokens
                seen["values"] += choice.logprobs.token_logprobs
            seen["finish"] = choice.finish_reason or seen["finish"]
    assert [(s["text"], s["finish"]) for s in streamed.values()] == [(c.text, c.finish_reason) for c in waited.choices]
    for seen, choice in zip(streamed.values(), waited.choices, strict=True):
        assert (seen["tokens"], seen["values"]) == (choice.logprobs.tokens, choice.logprobs.token_logprobs)
    assert chunks[-1].usage.completion_tokens == waited.usage.completion_tokens == 20


def test_a_batch_of_completion_lines_answers_as_the_route_does(sdk):
    bodies = [
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0},
        {"model": MODEL, "prompt": token_ids("Water boils at"), "max_tokens": 0, "echo": True, "logprobs": 1},
        {"model": MODEL, "prompt": ["two", "prompts"], "max_tokens": 2},  # a line is one job: refused
    ]
    url = "/v1/completions"
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": url, "body": b} for i, b in enumerate(bodies)]
    batch = wait_batch(sdk, run_batch(sdk, lines, endpoint=url).id)
    assert batch.status == "completed" and batch.request_counts.completed == 2 and batch.request_counts.failed == 1
    answers = {line["custom_id"]: line["response"]["body"] for line in file_lines(sdk, batch.output_file_id)}
    for i, body in enumerate(bodies[:2]):
        direct = sdk.completions.create(**body).model_dump(mode="json")
        assert [c["text"] for c in answers[f"c{i}"]["choices"]] == [c["text"] for c in direct["choices"]]
        assert answers[f"c{i}"]["choices"][0]["logprobs"] == direct["choices"][0]["logprobs"]
    (error,) = file_lines(sdk, batch.error_file_id)
    assert error["custom_id"] == "c2" and error["response"]["body"]["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "after"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),  # 0 needs echo
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [10**6]}, "prompt"),  # outside tiny-llama's vocabulary
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"extra_body": {"surprise": 1}}, "surprise"),
    ],
)
def test_bad_parameters_are_400s_naming_the_parameter(sdk, fields, param):
    request = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2} | fields
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.completions.create(**request)
    assert raised.value.param == param, json.dumps(raised.value.body)
