"""Constrained decoding (ponder/engine/constraint.py, ponder/engine/grammar.py): the sampler takes
only the tokens a request's grammar allows, from the first output token, or for a reasoning model
from after `</think>`. The models have random weights: only the grammar makes their output valid."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from ponder.engine.config import SamplingParams
from ponder.engine.constraint import Constraint, ConstraintKind
from ponder.engine.errors import ConfigError
from ponder.engine.sequence import Sequence
from tests.conftest import TEST_KV_CACHE_BYTES
from tests.engine.test_resume import resumed

PROMPT = [(11 * i + 5) % 250 + 1 for i in range(20)]  # no other test's: their prefix-cache counts stay theirs
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
SETTLED = {  # a finite language: every sample ends, with random weights too
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


def person_errors(value) -> list[str]:
    """What in `value` PERSON forbids, by `jsonschema` (independent of the grammar library)."""
    return [error.message for error in jsonschema.Draft202012Validator(PERSON).iter_errors(value)]


def constrained(kind: ConstraintKind, spec="", choices=(), **fields) -> SamplingParams:
    constraint = Constraint(kind, json.dumps(spec) if isinstance(spec, dict) else spec, tuple(choices))
    return SamplingParams(**{"temperature": 1.0, "seed": 7, "max_tokens": 96, "constraint": constraint, **fields})


def test_a_constraint_that_admits_every_continuation_gives_the_unconstrained_greedy_tokens(make_llm):
    llm = make_llm("tiny-r1")  # its random greedy tokens are ordinary text (no special or padding ids)
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    anything = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, constraint=Constraint("regex", r"[\s\S]*"))
    (expected,), (got,) = llm.generate([PROMPT], free), llm.generate([PROMPT], anything)
    assert got.token_ids == expected.token_ids


def test_each_of_n_sampled_answers_of_a_random_model_follows_the_json_schema(make_llm):
    """n = 8: the prompt is prefilled once and forked; each sample's matcher is its own."""
    (output,) = make_llm("tiny-llama").generate([PROMPT], constrained("json_schema", PERSON, n=8))
    finished = [sample for sample in output.outputs if sample.finish_reason == "stop"]
    assert len(finished) >= 4, [sample.text for sample in output.outputs]
    assert len({sample.text for sample in finished}) > 1  # sampled, not one answer
    for sample in finished:
        assert person_errors(json.loads(sample.text)) == [], sample.text
    unconstrained = make_llm("tiny-llama").generate([PROMPT], SamplingParams(temperature=1.0, seed=7, max_tokens=96))
    with pytest.raises(ValueError):  # without the grammar the same model writes no JSON
        json.loads(unconstrained[0].text)


@pytest.mark.parametrize(
    ("kind", "spec", "choices", "check"),
    [
        ("regex", r"[0-9]{3}-[a-z]{2}", (), lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)),
        ("choice", "", ("yes", "no", "maybe so"), lambda text: text in ("yes", "no", "maybe so")),
        (
            "grammar",
            'start: "(" NUMBER ")"\nNUMBER: /[1-9][0-9]?/',
            (),
            lambda text: re.fullmatch(r"\([1-9][0-9]?\)", text),
        ),
        ("json_object", "", (), lambda text: isinstance(json.loads(text), dict)),
    ],
)
def test_regex_choice_grammar_and_json_object_answers(make_llm, kind, spec, choices, check):
    (output,) = make_llm("tiny-llama").generate([PROMPT], constrained(kind, spec, choices, n=4, max_tokens=48))
    finished = [sample.text for sample in output.outputs if sample.finish_reason == "stop"]
    assert finished, [sample.text for sample in output.outputs]
    assert all(check(text) for text in finished), finished


def test_the_reasoning_is_free_and_the_answer_after_think_is_constrained(make_llm):
    """tiny-r1's template opens `<think>`: its reasoning (random text, ended by the thinking
    budget's forced `</think>`) is unconstrained; its content is the schema's."""
    messages = [{"role": "user", "content": "Pick a color."}]
    params = constrained("json_schema", SETTLED, n=3, max_tokens=64, max_reasoning_tokens=12)
    (output,) = make_llm("tiny-r1").chat(messages, params)
    for sample in output.outputs:
        assert sample.finish_reason == "stop", sample.text
        answer = json.loads(sample.content)
        assert set(answer) == {"ok", "color"} and isinstance(answer["ok"], bool) and answer["color"] in ("red", "green")
        assert sample.reasoning_content and "{" not in sample.reasoning_content[:1]  # free text, not the JSON
        with pytest.raises(ValueError):
            json.loads(sample.reasoning_content)


def test_a_resumed_constrained_request_ends_as_the_uninterrupted_one(make_llm):
    """A checkpoint's tokens rebuild the matcher: what follows is what the undisturbed run drew."""
    llm = make_llm("tiny-llama")
    params = constrained("json_schema", PERSON)
    (whole,) = llm.generate([PROMPT], params)
    assert whole.finish_reason == "stop" and person_errors(json.loads(whole.text)) == []
    for cut in (1, 5, len(whole.token_ids) - 1):
        assert resumed(llm, PROMPT, params, whole.token_ids[:cut]).token_ids == whole.token_ids


@pytest.mark.parametrize(
    ("kind", "spec", "choices", "message"),
    [
        ("json_schema", '{"type": "objectx"}', (), "objectx"),
        ("json_schema", "{not json", (), "not JSON"),
        ("regex", "a(b", (), "unclosed group"),
        ("grammar", "start: foo", (), "unknown name"),
        ("choice", "", (), "at least one"),
    ],
)
def test_a_constraint_that_cannot_be_compiled_is_refused_when_made(kind, spec, choices, message):
    with pytest.raises(ConfigError, match=message):
        Constraint(kind, spec, choices)


def test_sample_i_of_a_constrained_request_is_the_single_request_with_sample_index_i(make_llm):
    """Each forked sample's matcher starts from sample 0's tokens before the fork, then its own."""
    llm = make_llm("tiny-llama")
    (forked,) = llm.generate([PROMPT], constrained("json_schema", PERSON, n=3))
    singles = llm.generate([PROMPT] * 3, [constrained("json_schema", PERSON, sample_index=i) for i in range(3)])
    assert [sample.token_ids for sample in forked.outputs] == [single.token_ids for single in singles]


def test_preempting_constrained_samples_changes_no_tokens(make_llm):
    """8 blocks of 16 cannot hold 4 samples of up to ~116 tokens: samples are preempted and
    recomputed, their matchers untouched (the tokens did not change)."""
    params = constrained("json_schema", PERSON, n=4)
    (undisturbed,) = make_llm("tiny-llama").generate([PROMPT], params)
    engine = make_llm("tiny-llama", num_kv_blocks=8).engine
    engine.add_request("small", PROMPT, params)
    final = None
    while engine.has_unfinished_requests():
        final = next((out for out in engine.step() if out.finished), final)
    assert final is not None and final.metrics.num_preemptions > 0
    assert [sample.token_ids for sample in final.outputs] == [sample.token_ids for sample in undisturbed.outputs]


def test_speculative_decoding_gives_the_constrained_tokens_of_one_token_steps(make_llm):
    """Each row that verifies a draft is masked by the matcher advanced by the drafts before it (a
    refused draft is refused like any other token); drafts that end the reasoning start the answer's
    grammar mid-step. Greedy: exactly the tokens without drafts, reasoning and answer."""
    chunked = {"max_num_batched_tokens": 16, "kv_cache_memory": TEST_KV_CACHE_BYTES}  # test_speculative's engines
    messages = [{"role": "user", "content": "Describe a person."}]
    params = SamplingParams(
        temperature=0, max_tokens=64, max_reasoning_tokens=5, constraint=Constraint("json_schema", json.dumps(PERSON))
    )
    plain = make_llm("tiny-r1-mtp", **chunked)
    drafting = make_llm("tiny-r1-mtp", num_speculative_tokens=2, **chunked)  # two drafts: copies of copies
    for prompt_or_chat in ("chat", "prompt"):
        if prompt_or_chat == "chat":
            (expected,), (got,) = plain.chat(messages, params), drafting.chat(messages, params)
            assert got.content == expected.content and got.reasoning_content == expected.reasoning_content
        else:
            (expected,), (got,) = plain.generate([PROMPT], params), drafting.generate([PROMPT], params)
        assert got.token_ids == expected.token_ids
        assert got.metrics.num_draft_tokens > 0 and got.metrics.num_accepted_tokens > 0
    sampled = constrained("json_schema", PERSON, n=4, max_tokens=64, max_reasoning_tokens=5)
    (output,) = drafting.chat(messages, sampled)
    finished = [sample for sample in output.outputs if sample.finish_reason == "stop"]
    assert finished and all(person_errors(json.loads(sample.content)) == [] for sample in finished)


def test_drafts_that_end_the_reasoning_start_the_answers_grammar_mid_step(make_llm):
    """Rows after a draft `</think>` are the answer's: masked by a new matcher, then by its copy
    advanced by the drafts after the tag; rows before it are free; the sequence's own state
    stays at its tokens (nothing consumed for drafts that may fall)."""
    llm = make_llm("tiny-r1")
    grammars, tokenizer = llm.engine.model_runner.constraint_masks.grammars, llm.tokenizer
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Pick."}])
    params = SamplingParams(constraint=Constraint("json_schema", json.dumps(SETTLED)))
    seq = Sequence("drafts", prompt, params)
    seq.token_ids += tokenizer.encode("hmm", add_special_tokens=False)  # reasoning so far
    (think_end,) = tokenizer.encode("</think>", add_special_tokens=False)
    (brace,) = tokenizer.encode("{", add_special_tokens=False)
    rows = grammars.matchers([seq, seq, seq], [think_end, brace, -1])
    assert [row for _, row in rows] == [1, 2]  # row 0 (before the tag) is free
    (after_tag, _), (after_brace, _) = rows
    allowed = [_allowed(matcher, [brace, think_end]) for matcher in (after_tag, after_brace)]
    assert allowed == [{brace}, set()]  # the answer opens with `{`, and not again after it
    assert grammars.matchers([seq], [-1]) == []  # the sequence itself is still reasoning


def _allowed(matcher, tokens: list[int]) -> set[int]:
    return {token for token in tokens if matcher.validate_tokens([token]) == 1}


def test_a_stop_string_ends_a_constrained_answer_where_it_appears(make_llm):
    """Stop strings apply to the constrained answer as to any text: it ends before the stop (a
    JSON answer cut mid-object, finish_reason stop), the tokens up to it those of the same request
    without the stop string."""
    llm = make_llm("tiny-llama")
    whole = llm.generate([PROMPT], constrained("json_schema", PERSON))[0]
    assert '"age":' in whole.text
    (cut,) = llm.generate([PROMPT], constrained("json_schema", PERSON, stop=['"age":']))
    assert cut.finish_reason == "stop" and cut.text == whole.text[: whole.text.index('"age":')]


def test_a_grammar_is_compiled_once_and_each_sequence_gets_a_copy(make_llm):
    llm = make_llm("tiny-llama")
    grammars = llm.engine.model_runner.constraint_masks.grammars
    schema = {
        "type": "object",
        "properties": {"once": {"enum": [1, 2]}},
        "required": ["once"],
        "additionalProperties": False,
    }
    before = len(grammars._compiled)
    outputs = llm.generate([PROMPT, PROMPT[:10]], constrained("json_schema", schema, n=3, max_tokens=48))
    assert len(grammars._compiled) == before + 1  # six sequences, one compile
    texts = [s.text for o in outputs for s in o.outputs if s.finish_reason == "stop"]
    assert texts and all(json.loads(text)["once"] in (1, 2) for text in texts)
