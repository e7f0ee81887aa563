"""The self-consistency vote (ponder/workers/vote.py) on scripted answers: math-verify groups equivalent
forms, unparseable answers join no group, ties go to the earliest finished sample, and the stop
rules (leader cannot be overtaken; min_agreement). Also: the vote works off the main thread, where
math-verify's signal timeouts cannot run (the worker's job threads), through IsolatedClassifier."""

from __future__ import annotations

import threading

import pytest

from ponder.workers.vote import IsolatedClassifier, SampleVote, Tally, classify, field_value, vote


def test_equivalent_forms_are_one_group():
    result = vote([(0, "\\frac{1}{2}"), (1, "0.5"), (2, "3"), (3, "1/2"), (4, "\\dfrac{2}{4}")], n=5)
    assert result["answer"] == "\\frac{1}{2}"  # the first member's text, as it was written
    assert (result["count"], result["n"], result["agreement"]) == (4, 5, 0.8)
    assert result["groups"] == [
        {"answer": "\\frac{1}{2}", "count": 4, "samples": [0, 1, 3, 4]},
        {"answer": "3", "count": 1, "samples": [2]},
    ]
    assert result["unparsed"] == []


def test_different_values_are_different_groups():
    result = vote([(0, "0.5"), (1, "0.6"), (2, "0.6")], n=3)
    assert [(g["answer"], g["samples"]) for g in result["groups"]] == [("0.6", [1, 2]), ("0.5", [0])]
    assert result["answer"] == "0.6"


def test_unparseable_answers_join_no_group():
    result = vote([(0, None), (1, "}"), (2, "42"), (3, "x" * 2000)], n=4)
    assert result["unparsed"] == [0, 1, 3]
    assert result["groups"] == [{"answer": "42", "count": 1, "samples": [2]}]
    assert (result["answer"], result["agreement"]) == ("42", 0.25)


def test_all_unparseable_is_no_vote():
    result = vote([(0, None), (1, "}"), (2, "")], n=3)
    assert result == {"answer": None, "count": 0, "n": 3, "agreement": 0.0, "groups": [], "unparsed": [0, 1, 2]}


def test_a_tie_goes_to_the_earliest_finished_sample():
    # finish order 3, 1, 0, 2: sample 3 (answer 7) finished first, so 7 wins the 2-2 tie
    result = vote([(3, "7"), (1, "8"), (0, "8"), (2, "7")], n=4)
    assert result["answer"] == "7"
    assert [g["samples"] for g in result["groups"]] == [[3, 2], [1, 0]]
    flipped = vote([(1, "8"), (3, "7"), (0, "8"), (2, "7")], n=4)
    assert flipped["answer"] == "8"


def test_stops_once_the_leader_cannot_be_overtaken():
    tally = Tally(n=6)
    for index, answer in [(0, "12"), (1, "12")]:
        tally.add(index, answer)
    assert not tally.should_stop(running=4, early_stop=True, min_agreement=None)  # 2 > 0 + 4? no
    tally.add(2, "12")
    assert not tally.should_stop(running=3, early_stop=True, min_agreement=None)  # 3 > 0 + 3? no: a tie is possible
    tally.add(3, "13")
    assert not tally.should_stop(running=2, early_stop=True, min_agreement=None)  # 3 > 1 + 2? no: 13 may tie
    tally.add(4, "12.0")
    assert tally.should_stop(running=1, early_stop=True, min_agreement=None)  # 4 > 1 + 1
    assert not tally.should_stop(running=1, early_stop=False, min_agreement=None)  # not asked
    assert not tally.should_stop(running=0, early_stop=True, min_agreement=None)  # nothing left to stop


def test_min_agreement_stops_at_that_share_of_n():
    tally = Tally(n=8)
    tally.add(0, "5")
    tally.add(1, "5.0")
    assert not tally.should_stop(running=6, early_stop=False, min_agreement=0.375)  # 2 of 8 < 3
    tally.add(2, "\\frac{10}{2}")
    assert tally.should_stop(running=5, early_stop=False, min_agreement=0.375)  # 3 of 8 = 0.375
    assert not tally.should_stop(running=5, early_stop=True, min_agreement=None)  # 3 > 0 + 5? no
    assert tally.result()["agreement"] == 0.375


def test_a_sample_counts_once():
    tally = Tally(n=2)
    tally.add(0, "1")
    tally.add(0, "1")
    assert tally.result()["count"] == 1


def test_off_the_main_thread_math_verify_runs_without_its_signal_timeouts():
    """In a thread, math-verify's SIGALRM timeouts would refuse (and the answer look unparseable):
    classify turns them off there; IsolatedClassifier runs them in a child's main thread."""
    isolated = IsolatedClassifier()
    results: dict[str, object] = {}

    def in_a_thread():
        results["plain"] = classify("0.5", ["\\frac{1}{2}"])
        results["isolated"] = [isolated("0.5", ["7", "\\frac{1}{2}"]), isolated("}", []), isolated("9", ["7"])]
        results["vote"] = vote([(0, "1/2"), (1, "0.5")], n=2, classifier=isolated)["count"]

    thread = threading.Thread(target=in_a_thread)
    try:
        thread.start()
        thread.join(120)
    finally:
        isolated.close()
    assert results == {"plain": 0, "isolated": [1, None, 1], "vote": 2}


@pytest.mark.slow
def test_a_stuck_comparison_is_killed_and_counts_unparseable():
    isolated = IsolatedClassifier(seconds_per_comparison=0.001, start_seconds=0.001)
    try:
        assert isolated("0.5", ["\\frac{1}{2}"]) is None  # the child cannot even start in a millisecond
        assert isolated._pool is None  # killed; the next call starts a fresh one
        isolated.seconds_per_comparison, isolated.start_seconds = 10, 60
        assert isolated("0.5", ["\\frac{1}{2}"]) == 0
    finally:
        isolated.close()


def test_the_final_webhook_carries_the_vote():
    import json
    import uuid

    from ponder.service.tables import Job, utcnow
    from ponder.service.webhooks.signing import event_payload

    result = vote([(0, "1/2"), (1, "0.5"), (2, "3")], n=4)
    job = Job(
        api_key_id=uuid.uuid4(),
        model="m",
        request={"n": 4},
        prompt_token_ids=[1],
        expires_at=utcnow(),
        status="succeeded",
        answer=result["answer"],
        vote=result,
        stopped_early=True,
        early_stop_unspent_tokens=90,
    )
    data = json.loads(event_payload(job, "job.succeeded", "http://api", "2026-12-01T00:00:00Z"))["data"]
    assert (data["answer"], data["vote"], data["stopped_early"]) == ("1/2", result, True)
    assert data["vote"]["groups"][0] == {"answer": "1/2", "count": 2, "samples": [0, 1]}


def test_vote_field_groups_json_answers_by_one_fields_value():
    """`vote.field`: the samples' JSON answers grouped by that field's value (equal JSON, key
    order aside), no \\boxed{} involved; a sample without the field (or no JSON) is unparsed."""
    from types import SimpleNamespace

    stopped: list[int] = []
    request = {"n": 5, "max_tokens": 9, "vote": {"field": "result.color", "early_stop": True}}
    tally = SampleVote.for_request(request, stopped.append)
    assert tally is not None

    def finished(index: int, content: str):
        return SimpleNamespace(index=index, content=content, answer=None, finish_reason="stop", completion_tokens=3)

    running = [SimpleNamespace(index=i, finish_reason=None) for i in range(5)]
    contents = ['{"result":{"color":{"r":1,"g":2}}}', '{"result":{"color":{"g":2,"r":1}},"x":1}', "not json"]
    for index, content in enumerate(contents):
        tally.observe(SimpleNamespace(outputs=[finished(index, content), *running[index + 1 :]]))
    result = tally.tally.result()
    assert result["groups"] == [{"answer": '{"g":2,"r":1}', "count": 2, "samples": [0, 1]}]
    assert result["unparsed"] == [2] and result["answer"] == '{"g":2,"r":1}'
    assert stopped == []  # 2 against 0 with 2 still running: not yet decided
    assert field_value("a")(SimpleNamespace(content='{"b": 1}')) is None
