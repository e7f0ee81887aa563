"""Per-sample text state: incremental detokenisation, stop strings, the reasoning split, the
thinking budget; and the outputs each step returns, one RequestOutput per request with one
CompletionOutput per sample with news. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ponder.engine.detokenizer import IncrementalDetokenizer
from ponder.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob, Usage
from ponder.engine.reasoning import (
    THINK_END,
    THINK_END_FORCED,
    ReasoningParser,
    count_reasoning_tokens,
    extract_boxed_answer,
    prompt_opens_thinking,
)
from ponder.engine.scheduler import Scheduler
from ponder.engine.sequence import Sequence
from ponder.engine.tokenizer import Tokenizer


@dataclass
class SampleState:
    """One sample's text state; `result` is its CompletionOutput once it has finished (no deltas)."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    parser: ReasoningParser
    num_seen: int = 0  # output tokens already turned into text
    forced_think_end: bool = False
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    result: CompletionOutput | None = None


@dataclass
class RequestState:
    """A request's samples by index: sample 0 alone until the fork, then all n."""

    samples: dict[int, SampleState]
    prompt_logprobs_sent: bool = False  # (SamplingParams.prompt_logprobs) in an output with news yet

    @property
    def first(self) -> SampleState:
        return self.samples[0]

    @property
    def finished(self) -> bool:
        """Every sample has finished; a request that ended before forking has only sample 0."""
        forked = len(self.samples) == self.first.seq.params.n or self.first.seq.fork_pending
        return forked and all(sample.result is not None for sample in self.samples.values())


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.states: dict[str, RequestState] = {}
        self.think_end_ids = tokenizer.encode(THINK_END, add_special_tokens=False)
        self.think_end_forced_ids = tokenizer.encode(THINK_END_FORCED, add_special_tokens=False)

    def add(self, seq: Sequence) -> None:
        state = self._new_sample(seq)
        self.states[seq.request_id] = RequestState(samples={seq.index: state})
        if seq.num_output_tokens:  # resumed: replay the earlier run's tokens into the text state
            self._consume_new_tokens(state, CompletionOutput(index=seq.index), replay=True)
        if self._thinking_budget_spent(state):  # a budget of 0: the end tag comes before any model token
            self._force_think_end(state)

    def _new_sample(self, seq: Sequence) -> SampleState:
        params = seq.params
        return SampleState(
            seq=seq,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, params.stop, params.skip_special_tokens, params.min_tokens
            ),
            parser=ReasoningParser(
                reasoning_mode=prompt_opens_thinking(self.tokenizer, seq.prompt_token_ids),
                split=params.split_reasoning,
            ),
        )

    def process(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """One RequestOutput per request among `seqs` (the step's sequences with new tokens, the
        samples it forked included); a request failed during the step is left out."""
        live = [seq for seq in seqs if seq.request_id in self.states]
        for seq in live:  # samples forked this step start from sample 0's state before its news
            self._fork_state(self.states[seq.request_id], seq)
        news: dict[str, list[CompletionOutput]] = {}
        for seq in live:
            sample = self.states[seq.request_id].samples[seq.index]
            news.setdefault(seq.request_id, []).append(self._process(sample))
        return [self._request_output(request_id, completions) for request_id, completions in news.items()]

    def _fork_state(self, request: RequestState, seq: Sequence) -> None:
        """A forked sample's text state: sample 0's before the fork (nothing seen yet; the thinking
        budget's forced tag, when a budget of 0 forced it, is in both sequences' tokens)."""
        if seq.index in request.samples:
            return
        assert request.first.num_seen == 0, "a request forks before any of its output is processed"
        state = request.samples[seq.index] = self._new_sample(seq)
        state.forced_think_end = request.first.forced_think_end

    def _process(self, state: SampleState) -> CompletionOutput:
        seq = state.seq
        completion = CompletionOutput(index=seq.index)
        self._consume_new_tokens(state, completion)
        if self._thinking_budget_spent(state):
            self._force_think_end(state)
            self._consume_new_tokens(state, completion)  # the forced tag streams now, or ends the sample
        if seq.is_finished:
            self._finish(state, completion)
        return completion

    def _consume_new_tokens(self, state: SampleState, output: CompletionOutput, replay: bool = False) -> None:
        """Turn the sample's unseen output tokens into text (stop strings end it there). A sample
        that wants log probabilities is sent only the tokens whose values are known, until it ends:
        a forced tag's come one step after it was appended (Sequence.unscored)."""
        seq = state.seq
        new_ids = seq.token_ids[seq.num_prompt_tokens + state.num_seen :]
        if seq.params.logprobs is not None and not replay and not seq.is_finished:
            new_ids = new_ids[: max(len(seq.output_logprobs) - state.num_seen, 0)]
        delta = ""
        for n, token_id in enumerate(new_ids, start=1):  # one at a time, as one-token steps would feed them
            delta += state.detokenizer.add_tokens([token_id])
            if state.detokenizer.stopped_by is not None:
                self._stop_at(seq, seq.num_prompt_tokens + state.num_seen + n)
                new_ids = new_ids[:n]
                break
        if seq.params.logprobs is not None:
            output.new_logprobs = (output.new_logprobs or []) + _values(seq, state.num_seen, len(new_ids))
        state.num_seen += len(new_ids)
        output.new_token_ids += new_ids
        if seq.is_finished:
            delta += state.detokenizer.finish()
        self._emit(state, output, delta, final=seq.is_finished)

    def _stop_at(self, seq: Sequence, length: int) -> None:
        """A stop string ended at token `length`: the sample ends there. Tokens after it (a step
        that accepted drafts adds several) are dropped, and a length limit they reached does not count."""
        if len(seq) > length and seq.is_finished:
            seq.finish_reason = "stop"
        self.scheduler.finish(seq, "stop")
        seq.truncate(length)  # safe: a finished sequence holds no blocks

    def _emit(self, state: SampleState, output: CompletionOutput, delta: str, final: bool) -> None:
        reasoning, content = state.parser.feed(delta)
        if final:
            tail_reasoning, tail_content = state.parser.finish()
            reasoning, content = reasoning + tail_reasoning, content + tail_content
        output.delta_text += delta
        output.delta_reasoning += reasoning
        output.delta_content += content
        state.text.append(delta)
        state.reasoning.append(reasoning)
        state.content.append(content)

    def _force_think_end(self, state: SampleState) -> None:
        """Append the end-of-thinking tag where the budget ran out. A request resumed from a
        checkpoint cut inside the tag (only an engine caller can cut there: a step reports the
        whole tag at once) gets the rest of it, so the tag is never written twice."""
        seq, budget = state.seq, state.seq.params.max_reasoning_tokens or 0
        written = seq.output_token_ids[budget:]  # the tag starts exactly at the budget
        forced = self.think_end_forced_ids
        rest = forced[len(written) :] if forced[: len(written)] == written else forced
        self.scheduler.force_tokens(seq, rest)
        state.forced_think_end = True

    def _thinking_budget_spent(self, state: SampleState) -> bool:
        budget = state.seq.params.max_reasoning_tokens
        return (
            budget is not None
            and not state.forced_think_end
            and not state.seq.is_finished
            and state.parser.in_reasoning
            and state.seq.num_output_tokens >= budget
        )

    def abort(self, request_id: str, index: int | None = None) -> RequestOutput:
        """The news of samples the engine has just finished outside a step (abort, error): every
        unfinished sample of the request, or only sample `index`."""
        request = self.states[request_id]
        completions = []
        for state in request.samples.values():
            if state.result is None and index in (None, state.seq.index):
                completion = CompletionOutput(index=state.seq.index)
                self._consume_new_tokens(state, completion)  # finished: the rest of its text, if any
                self._finish(state, completion)
                completions.append(completion)
        return self._request_output(request_id, completions)

    def _finish(self, state: SampleState, completion: CompletionOutput) -> None:
        seq = state.seq
        completion.finish_reason = seq.finish_reason
        completion.token_ids = seq.output_token_ids
        completion.text = "".join(state.text)
        completion.reasoning_content = "".join(state.reasoning)
        completion.content = "".join(state.content)
        completion.answer = extract_boxed_answer(completion.content)
        completion.completion_tokens = seq.num_output_tokens
        in_reasoning = state.parser.in_reasoning or state.parser.saw_reasoning
        think_end_ids = self.think_end_ids if seq.params.split_reasoning else []  # (no split: no reasoning)
        completion.reasoning_tokens = count_reasoning_tokens(seq.output_token_ids, think_end_ids, in_reasoning)
        if seq.params.logprobs is not None:
            completion.logprobs = _values(seq, 0, seq.num_output_tokens)
        no_logprobs: list[TokenLogprob] | None = [] if completion.new_logprobs is not None else None
        state.result = replace(
            completion, new_token_ids=[], delta_text="", delta_reasoning="", delta_content="", new_logprobs=no_logprobs
        )

    def _request_output(self, request_id: str, completions: list[CompletionOutput]) -> RequestOutput:
        """The request's output for this news; once every sample has finished, the final one (the
        request's state goes)."""
        request = self.states[request_id]
        output = RequestOutput(request_id=request_id, outputs=sorted(completions, key=lambda c: c.index))
        if not request.prompt_logprobs_sent or request.finished:
            output.prompt_logprobs = request.first.seq.prompt_logprobs
            request.prompt_logprobs_sent = output.prompt_logprobs is not None
        if request.finished:
            del self.states[request_id]
            output.outputs = self._results(request, completions)
            output.finished = True
            output.prompt_token_ids = request.first.seq.prompt_token_ids
            output.usage = self._usage(request, output.outputs)
            output.metrics = self._metrics(request)
        _mirror_sample_0(output)
        return output

    @staticmethod
    def _results(request: RequestState, completions: list[CompletionOutput]) -> list[CompletionOutput]:
        """Every sample's result, with its deltas where it has news this step. A request that ended
        before forking reports sample 0 as every sample."""
        news = {c.index: c for c in completions}
        results = []
        for i in range(request.first.seq.params.n):
            sample = request.samples.get(i, request.first)
            result = news.get(sample.seq.index) or sample.result
            assert result is not None, "the request has finished: so has every sample"
            results.append(result if result.index == i else replace(result, index=i))
        return results

    def _usage(self, request: RequestState, completions: list[CompletionOutput]) -> Usage:
        seq = request.first.seq
        return Usage(
            prompt_tokens=seq.num_prompt_tokens,
            cached_tokens=min(seq.num_cached_tokens or 0, seq.num_prompt_tokens),  # (not a resumed output's)
            completion_tokens=sum(c.completion_tokens for c in completions),
            reasoning_tokens=sum(c.reasoning_tokens for c in completions),
        )

    @staticmethod
    def _metrics(request: RequestState) -> RequestMetrics:
        """The request's times (first token: the earliest sample's; finished: the last's) and its
        samples' preemptions and drafts summed."""
        seqs = [sample.seq for sample in request.samples.values()]
        first_tokens = [s.first_token_time for s in seqs if s.first_token_time is not None]
        finishes = [s.finished_time for s in seqs if s.finished_time is not None]
        return RequestMetrics(
            arrival_time=request.first.seq.arrival_time,
            first_scheduled_time=request.first.seq.first_scheduled_time,
            first_token_time=min(first_tokens, default=None),
            finished_time=max(finishes, default=None),
            num_preemptions=sum(s.num_preemptions for s in seqs),
            num_draft_tokens=sum(s.num_draft_tokens for s in seqs),
            num_accepted_tokens=sum(s.num_accepted_tokens for s in seqs),
        )


def _mirror_sample_0(output: RequestOutput) -> None:
    """The single-sample fields read sample 0: its news, and its result once the request finished."""
    first = next((c for c in output.outputs if c.index == 0), None)
    if first is None:
        return
    output.new_token_ids = first.new_token_ids
    output.new_logprobs = first.new_logprobs
    output.delta_text, output.delta_reasoning, output.delta_content = (
        first.delta_text,
        first.delta_reasoning,
        first.delta_content,
    )
    if output.finished:
        output.finish_reason, output.token_ids, output.answer = first.finish_reason, first.token_ids, first.answer
        output.logprobs = first.logprobs
        output.text, output.reasoning_content, output.content = first.text, first.reasoning_content, first.content


def _values(seq: Sequence, first: int, count: int) -> list[TokenLogprob]:
    """The log probabilities of output tokens first..first+count-1; a token the model never ran (a
    forced tag the sample ended on) has none (TokenLogprob.logprob None)."""
    known = seq.output_logprobs[first : first + count]
    tokens = seq.output_token_ids[first + len(known) : first + count]
    return known + [TokenLogprob(token, None) for token in tokens]
