"""Validity (issue 25), small: benchmarks/structured_validity.py's measurement, 6 seeded sampled
requests per schema (30; the benchmark runs 200) at temperature 1.0 on tiny-r1's random weights.
Every answer that finished validates with `jsonschema`; no reasoning is admitted by its schema."""

from __future__ import annotations

from benchmarks.structured_validity import measure, measure_tool_calls


def test_every_finished_answer_of_sampled_requests_validates_and_the_reasoning_is_free(make_llm):
    result = measure(make_llm("tiny-r1"), per_schema=6)
    assert result.invalid == []
    assert result.admitted_reasoning == []
    assert result.finished >= 0.9 * result.requests, f"{result.finished} of {result.requests} finished"


def test_every_required_tool_call_parses_and_its_arguments_validate(make_llm):
    result = measure_tool_calls(make_llm("tiny-r1"), requests=16)
    assert result.invalid == []
    assert result.finished >= 0.8 * result.requests, f"{result.finished} of {result.requests} finished"
