"""Per-request text state: incremental detokenisation, stop strings, the reasoning split, the
thinking budget, and the outputs each step returns. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestMetrics, RequestOutput, Usage
from engine.reasoning import (
    THINK_END,
    THINK_END_FORCED,
    THINK_START,
    ReasoningParser,
    count_reasoning_tokens,
    extract_boxed_answer,
)
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer


@dataclass
class RequestState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    parser: ReasoningParser
    num_seen: int = 0  # output tokens already turned into text
    forced_think_end: bool = False
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.states: dict[str, RequestState] = {}
        self.think_end_ids = tokenizer.encode(THINK_END, add_special_tokens=False)
        self.think_end_forced_ids = tokenizer.encode(THINK_END_FORCED, add_special_tokens=False)

    def add(self, seq: Sequence) -> None:
        params = seq.params
        state = self.states[seq.request_id] = RequestState(
            seq=seq,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, params.stop, params.skip_special_tokens
            ),
            parser=ReasoningParser(reasoning_mode=self._prompt_opens_thinking(seq.prompt_token_ids)),
        )
        if seq.num_output_tokens:  # resumed: replay the earlier run's tokens into the text state
            self._consume_new_tokens(state, RequestOutput(request_id=seq.request_id))
        if self._thinking_budget_spent(state):  # a budget of 0: the end tag comes before any model token
            self._force_think_end(state)

    def _prompt_opens_thinking(self, prompt_token_ids: list[int]) -> bool:
        """R1's template ends the prompt with `<think>\\n`: then the output starts inside reasoning."""
        tail = self.tokenizer.decode(prompt_token_ids[-8:], skip_special_tokens=False)
        return tail.rstrip().endswith(THINK_START)

    def process(self, seqs: list[Sequence]) -> list[RequestOutput]:
        return [self._process(seq) for seq in seqs]

    def _process(self, seq: Sequence) -> RequestOutput:
        state = self.states[seq.request_id]
        output = RequestOutput(request_id=seq.request_id)
        self._consume_new_tokens(state, output)
        if self._thinking_budget_spent(state):
            self._force_think_end(state)
            self._consume_new_tokens(state, output)  # the forced tag streams now, or ends the request
        if seq.is_finished:
            self._finish(state, output)
        return output

    def _consume_new_tokens(self, state: RequestState, output: RequestOutput) -> None:
        seq = state.seq
        new_ids = seq.token_ids[seq.num_prompt_tokens + state.num_seen :]
        delta = ""
        for n, token_id in enumerate(new_ids, start=1):  # one at a time, as one-token steps would feed them
            delta += state.detokenizer.add_tokens([token_id])
            if state.detokenizer.stopped_by is not None:
                self._stop_at(seq, seq.num_prompt_tokens + state.num_seen + n)
                new_ids = new_ids[:n]
                break
        state.num_seen += len(new_ids)
        output.new_token_ids += new_ids
        if seq.is_finished:
            delta += state.detokenizer.finish()
        self._emit(state, output, delta, final=seq.is_finished)

    def _stop_at(self, seq: Sequence, length: int) -> None:
        """A stop string ended at token `length`: the request ends there. Tokens after it (a step
        that accepted drafts adds several) are dropped, and a length limit they reached does not count."""
        if len(seq) > length and seq.is_finished:
            seq.finish_reason = "stop"
        self.scheduler.finish(seq, "stop")
        del seq.token_ids[length:]  # safe: a finished sequence holds no blocks

    def _emit(self, state: RequestState, output: RequestOutput, delta: str, final: bool) -> None:
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

    def _force_think_end(self, state: RequestState) -> None:
        """Append the end-of-thinking tag where the budget ran out. A request resumed from a
        checkpoint cut inside the tag (only an engine caller can cut there: a step reports the
        whole tag at once) gets the rest of it, so the tag is never written twice."""
        seq, budget = state.seq, state.seq.params.max_reasoning_tokens or 0
        written = seq.output_token_ids[budget:]  # the tag starts exactly at the budget
        forced = self.think_end_forced_ids
        rest = forced[len(written) :] if forced[: len(written)] == written else forced
        self.scheduler.force_tokens(seq, rest)
        state.forced_think_end = True

    def _thinking_budget_spent(self, state: RequestState) -> bool:
        budget = state.seq.params.max_reasoning_tokens
        return (
            budget is not None
            and not state.forced_think_end
            and not state.seq.is_finished
            and state.parser.in_reasoning
            and state.seq.num_output_tokens >= budget
        )

    def abort(self, seq: Sequence) -> RequestOutput:
        state = self.states[seq.request_id]
        output = RequestOutput(request_id=seq.request_id)
        self._emit(state, output, state.detokenizer.finish(), final=True)
        self._finish(state, output)
        return output

    def _finish(self, state: RequestState, output: RequestOutput) -> None:
        seq = state.seq
        del self.states[seq.request_id]
        output.finished = True
        output.finish_reason = seq.finish_reason
        output.prompt_token_ids = seq.token_ids[: seq.num_prompt_tokens]
        output.token_ids = seq.output_token_ids
        output.text = "".join(state.text)
        output.reasoning_content = "".join(state.reasoning)
        output.content = "".join(state.content)
        output.answer = extract_boxed_answer(output.content)
        output.usage = self.usage(state)
        output.metrics = RequestMetrics(
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
            finished_time=seq.finished_time,
            num_preemptions=seq.num_preemptions,
            num_draft_tokens=seq.num_draft_tokens,
            num_accepted_tokens=seq.num_accepted_tokens,
        )

    def usage(self, state: RequestState) -> Usage:
        seq = state.seq
        in_reasoning = state.parser.in_reasoning or state.parser.saw_reasoning
        return Usage(
            prompt_tokens=seq.num_prompt_tokens,
            cached_tokens=min(seq.num_cached_tokens or 0, seq.num_prompt_tokens),  # (not a resumed output's)
            completion_tokens=seq.num_output_tokens,
            reasoning_tokens=count_reasoning_tokens(seq.output_token_ids, self.think_end_ids, in_reasoning),
        )
