"""Self-consistency: the majority vote over an n-sample job's answers
(docs/architecture.md#self-consistency). The worker votes (it has the samples as they finish and
can stop the rest early); the API only shows the stored vote, so math-verify (and sympy) are the
worker's dependencies (the `engine` extra), never the slim API image's.

The rules, in one place:

- A sample's answer is its last `\\boxed{}` (the engine's `CompletionOutput.answer`); with
  `vote.field` (a job whose answer is JSON) the value of that field instead, grouped by equal
  values (canonical JSON text), math-verify not involved. It is parsed
  with math-verify (`math_verify.parse`); a missing answer, one longer than `MAX_ANSWER_CHARS`, or
  one math-verify turns into no expression (only its string fallback) is **unparseable** and joins
  no group (it still counts in n).
- Samples are taken in the order they finished. A sample joins the first group (in the order the
  groups were formed) whose representative verifies equal to its answer (`math_verify.verify`,
  gold = the representative), else it forms a new group. A group's representative is its first
  member's answer text, as that sample wrote it.
- The vote's answer is the representative of the largest group; **ties go to the group whose first
  member finished earliest** (the group formed first). No parseable answer: the answer is null.
- `agreement` = the winning group's count / n, n being the job's samples (unparseable and
  early-stopped ones included).

math-verify bounds each parse and comparison with SIGALRM, which works only in a process's main
thread (elsewhere it refuses, and parse/verify quietly return nothing). The worker runs jobs in
threads, so it votes through `IsolatedClassifier`: a child process whose main thread runs the
math, killed if a comparison is stuck where the alarm cannot reach (C code).
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("ponder.worker")

MAX_ANSWER_CHARS = 1000  # a longer \boxed{} is no short final answer: unparseable (bounds the work)
TIMEOUT_SECONDS = 5  # math-verify's own bound on one parse or one comparison (main thread only)

# Which group an answer joins given the groups' representatives: an index into them, their count for
# a new group, None when the answer is unparseable.
Classifier = Callable[[str | None, Sequence[str]], int | None]


@functools.lru_cache(maxsize=4096)
def _parse(answer: str, timeout: int | None) -> list[Any] | None:
    from math_verify import parse  # here: importing sympy costs ~0.5 s, paid only by a process that votes

    parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
    return parsed if any(not isinstance(p, str) for p in parsed) else None  # only the string: no expression


def classify(answer: str | None, representatives: Sequence[str]) -> int | None:
    """The group `answer` joins: the index of the first representative it verifies equal to,
    len(representatives) for a new group, None when it is unparseable. In a main thread
    math-verify's timeouts bound each step; in another thread they cannot run and are off (use
    IsolatedClassifier there when the answers come from outside)."""
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    parsed = _parse(answer, timeout)
    if parsed is None:
        return None
    from math_verify import verify

    for i, representative in enumerate(representatives):
        gold = _parse(representative, timeout)
        if gold is not None and verify(gold, parsed, timeout_seconds=timeout):
            return i
    return len(representatives)


class IsolatedClassifier:
    """`classify` in a child process (spawned, so no copy of the worker's threads or CUDA state):
    there it runs in the main thread, so math-verify's timeouts work; a call still unanswered after
    its deadline (a comparison stuck in C code) kills the child, and the answer counts as
    unparseable. One child per worker process, shared by its job threads one call at a time (a
    call takes milliseconds); it starts on the first vote (~1 s: Python, sympy, math-verify)."""

    def __init__(self, seconds_per_comparison: float = 2 * TIMEOUT_SECONDS, start_seconds: float = 60) -> None:
        self.seconds_per_comparison, self.start_seconds = seconds_per_comparison, start_seconds
        self._lock = threading.Lock()
        self._pool: Any = None
        self._started = False

    def __call__(self, answer: str | None, representatives: Sequence[str]) -> int | None:
        if not answer or len(answer) > MAX_ANSWER_CHARS:
            return None
        with self._lock:
            if self._pool is None:
                self._pool, self._started = multiprocessing.get_context("spawn").Pool(1), False
            deadline = self.seconds_per_comparison * (1 + len(representatives))
            deadline += 0 if self._started else self.start_seconds
            pending = self._pool.apply_async(classify, (answer, list(representatives)))
            try:
                group = pending.get(deadline)
            except multiprocessing.TimeoutError:
                logger.warning(
                    "vote: answer %r not classified within %.0f s; counted unparseable", answer[:80], deadline
                )
                self.close()
                return None
            self._started = True
            return group

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None


@dataclass
class Group:
    answer: str  # the representative: the first member's answer text
    samples: list[int] = field(default_factory=list)  # sample indices, in finish order


class Tally:
    """The vote so far, fed one finished sample at a time (in finish order)."""

    def __init__(self, n: int, classifier: Classifier = classify) -> None:
        self.n, self.classifier = n, classifier
        self.groups: list[Group] = []  # in the order they were formed
        self.unparsed: list[int] = []
        self.counted: set[int] = set()

    def add(self, index: int, answer: str | None) -> None:
        """Count sample `index`'s answer (a sample counted already is ignored)."""
        if index in self.counted:
            return
        self.counted.add(index)
        group = self.classifier(answer, [g.answer for g in self.groups])
        if group is None:
            self.unparsed.append(index)
        elif group == len(self.groups):
            self.groups.append(Group(answer or "", [index]))
        else:
            self.groups[group].samples.append(index)

    def ranked(self) -> list[Group]:
        """Largest first; equal sizes in the order formed (the earliest first member first)."""
        return sorted(self.groups, key=lambda g: -len(g.samples))  # sorted() is stable

    def should_stop(self, running: int, early_stop: bool, min_agreement: float | None) -> bool:
        """Whether the samples still running can be stopped: `early_stop` and the leader cannot be
        overtaken nor tied (its count > the runner-up's + every running sample), or the leader has
        reached `min_agreement` of n."""
        ranked = self.ranked()
        if running <= 0 or not ranked:
            return False
        leader = len(ranked[0].samples)
        second = len(ranked[1].samples) if len(ranked) > 1 else 0
        if early_stop and leader > second + running:
            return True
        return min_agreement is not None and leader >= min_agreement * self.n

    def result(self) -> dict[str, Any]:
        """The vote as a job records it: {answer, count, n, agreement, groups: [{answer, count,
        samples}], unparsed: [indices]}, the winner first."""
        ranked = self.ranked()
        winner = ranked[0] if ranked else None
        count = len(winner.samples) if winner else 0
        return {
            "answer": winner.answer if winner else None,
            "count": count,
            "n": self.n,
            "agreement": count / self.n if self.n else 0.0,
            "groups": [{"answer": g.answer, "count": len(g.samples), "samples": list(g.samples)} for g in ranked],
            "unparsed": list(self.unparsed),
        }


def same_value(answer: str | None, representatives: Sequence[str]) -> int | None:
    """A `vote.field` answer's group: the representative with the same JSON value (both are
    canonical JSON text), else a new group; None when the sample had no such field."""
    if answer is None:
        return None
    return representatives.index(answer) if answer in representatives else len(representatives)


def field_value(path: str) -> Callable[[Any], str | None]:
    """A sample's answer under `vote.field`: the value at `path` (dot-separated object keys) of
    its JSON content, as canonical JSON text; None when the content is no JSON or lacks it."""

    def answer(sample: Any) -> str | None:
        try:
            value = json.loads(sample.content or "")
        except json.JSONDecodeError:
            return None
        for key in path.split("."):
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    return answer


def vote(samples: Iterable[tuple[int, str | None]], n: int, classifier: Classifier = classify) -> dict[str, Any]:
    """The vote over (sample index, answer) pairs given in the order the samples finished; n is the
    job's sample count (samples that never finished count in it too). See the module's rules."""
    tally = Tally(n, classifier)
    for index, answer in samples:
        tally.add(index, answer)
    return tally.result()


class SampleVote:
    """The vote of one running n-sample request, fed each step's output (`observe`): each sample is
    counted as it finishes, and once the rules allow (`Tally.should_stop`) every sample still running
    is stopped through `stop_sample(index)` (the engine host's abort_sample: their blocks are freed
    at once). A sample that finishes on its own before its stop lands is still counted; one that
    ends `abort` (stopped, cancelled) or `error` is not."""

    def __init__(
        self,
        n: int,
        max_tokens: int,
        stop_sample: Callable[[int], None],
        early_stop: bool = False,
        min_agreement: float | None = None,
        classifier: Classifier = classify,
        answer_of: Callable[[Any], str | None] = lambda sample: sample.answer,
    ) -> None:
        self.tally = Tally(n, classifier)
        self.answer_of = answer_of  # a finished sample's answer: its \boxed{}, or its `vote.field`
        self.max_tokens, self.stop_sample = max_tokens, stop_sample
        self.early_stop, self.min_agreement = early_stop, min_agreement
        self.finished: set[int] = set()
        self.stopped: set[int] = set()  # samples this vote stopped

    @classmethod
    def for_request(
        cls, request: dict[str, Any], stop_sample: Callable[[int], None], classifier: Classifier = classify
    ) -> SampleVote | None:
        """The vote of a job's stored request (None for n = 1); `request["vote"]`: its stop rules,
        and the JSON field its samples are grouped by instead of their `\boxed{}` (equal values)."""
        n = int(request.get("n") or 1)
        if n < 2:
            return None
        rules = request.get("vote") or {}
        vote = cls(
            n, int(request["max_tokens"]), stop_sample, bool(rules.get("early_stop")), rules.get("min_agreement")
        )
        vote.tally.classifier = same_value if rules.get("field") else classifier
        if rules.get("field"):
            vote.answer_of = field_value(rules["field"])
        return vote

    def observe(self, output) -> None:
        """One step's RequestOutput (ponder/engine/outputs.py) of the request."""
        for sample in output.outputs:
            if sample.finish_reason is None or sample.index in self.finished:
                continue
            self.finished.add(sample.index)
            if sample.finish_reason not in ("abort", "error"):
                self.tally.add(sample.index, self.answer_of(sample))
        running = [i for i in range(self.tally.n) if i not in self.finished and i not in self.stopped]
        if running and self.tally.should_stop(len(running), self.early_stop, self.min_agreement):
            for index in running:
                self.stopped.add(index)
                self.stop_sample(index)

    def record(self, final) -> dict[str, Any]:
        """The job's vote columns from the request's final output: the vote, whether it stopped
        samples, and the max_tokens budget the samples it stopped had left (an upper bound on what
        stopping saved: a sample may have ended sooner on its own)."""
        stopped = [c for c in final.outputs if c.index in self.stopped and c.finish_reason == "abort"]
        return {
            "vote": self.tally.result(),
            "stopped_early": bool(stopped),
            "early_stop_unspent_tokens": sum(max(self.max_tokens - c.completion_tokens, 0) for c in stopped),
        }
