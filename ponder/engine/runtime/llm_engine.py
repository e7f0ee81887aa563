"""The engine: requests in, one batched forward pass per `step()`, deltas out. A request with n
samples is prefilled once and forked into n sequences when its first tokens are sampled
(docs/architecture.md#parallel-sampling)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ponder.engine.config import EngineConfig, ModelConfig, SamplingParams
from ponder.engine.errors import ConfigError, RequestRejected, TensorParallelError
from ponder.engine.grammar import Grammars
from ponder.engine.model_store import resolve_model
from ponder.engine.output_processor import OutputProcessor
from ponder.engine.outputs import RequestOutput, TokenLogprob
from ponder.engine.runtime.model_runner import ModelRunner
from ponder.engine.scheduler import SampledTokens, ScheduledSequence, Scheduler
from ponder.engine.sequence import Sequence
from ponder.engine.stats import EngineSnapshot, EngineTotals, StepStats, snapshot
from ponder.engine.tokenizer import Tokenizer

logger = logging.getLogger("ponder.engine")


class LLMEngine:
    def __init__(self, model: str | Path, config: EngineConfig | None = None, **engine_config) -> None:
        self.config = config or EngineConfig(**engine_config)
        self.model_path = resolve_model(model)
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        self.tokenizer = Tokenizer.from_pretrained(self.model_path)
        self.max_model_len = self._max_model_len()
        self.model_runner = ModelRunner(self.model_path, self.model_config, self.config, self.max_model_len)
        eos_token_ids = self._eos_token_ids()  # read once: the scheduler stops on them, the grammars allow them
        self.scheduler = Scheduler(
            self.config,
            self.model_runner.num_blocks,
            self.max_model_len,
            eos_token_ids,
            self.model_runner.num_speculative_tokens,
        )
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler)
        grammars = Grammars(self.tokenizer, self.model_config.vocab_size, eos_token_ids)
        self.model_runner.constraint_masks.grammars = grammars  # rank 0 samples
        self.model_runner.eos_token_ids = eos_token_ids
        self._aborted: list[RequestOutput] = []
        self.last_step = StepStats()
        self.totals = EngineTotals()

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        output_token_ids: list[int] | None = None,
        cache_salt: str | None = None,
        output_logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        """Queue a request. `cache_salt`: only requests with the same salt share prefix-cache
        blocks (vLLM's cache_salt: one per tenant). `output_token_ids` resumes one that an earlier
        run (another process) had generated this far: they are prefilled with the prompt and
        continue as its output (counted in max_tokens, the thinking budget and usage once, their
        text replayed, not emitted again); with a seed, what follows is what the uninterrupted run
        would have sampled. A resumed request has one sample: sample i of an n-request resumes as
        n=1 with `sample_index=i`. `output_logprobs`: the values the earlier run computed for them
        (SamplingParams.logprobs), kept as they were; any not given are computed again by the prefill."""
        if request_id in self.output_processor.states:
            raise RequestRejected(f"request {request_id}: id already in use")
        vocab = self.model_config.vocab_size
        tokens = [*prompt_token_ids, *(output_token_ids or [])]
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
            raise RequestRejected(f"request {request_id}: prompt and output token ids must be integers in [0, {vocab})")
        seq = Sequence(request_id, prompt_token_ids, params or SamplingParams(), cache_salt=cache_salt)
        if bad := [t for t in seq.params.logit_bias if t >= vocab]:
            raise RequestRejected(
                f"request {request_id}: logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})"
            )
        seq.token_ids += output_token_ids or []
        if seq.params.logprobs is not None:
            seq.output_logprobs = list(output_logprobs or [])[: seq.num_output_tokens]
        try:
            self.model_runner.check_sampling(seq.params)
        except (RuntimeError, OverflowError, ValueError, TypeError) as e:
            raise RequestRejected(f"request {request_id}: sampling parameters the engine cannot use: {e}") from e
        self.scheduler.add(seq)
        self.output_processor.add(seq)
        if seq.is_finished:  # a thinking budget of 0 forced more tokens than max_tokens allows, or resumed at its end
            self._aborted += self.output_processor.process([seq])  # reported by the next step()

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        prefill_tokens = sum(s.num_new_tokens for s in scheduled if _is_prefill(s))  # before update() moves on
        self._copy_blocks()
        sampled = self._execute(scheduled)
        self.scheduler.update(scheduled, sampled)
        self._copy_blocks()  # a fork's own copies of the last prompt block, which drafting writes into
        self._propose(scheduled)
        with_news = [seq for s, t in zip(scheduled, sampled, strict=True) if t.token_ids for seq in (s.seq, *s.forked)]
        outputs = self.output_processor.process(with_news)
        outputs, self._aborted = self._aborted + outputs, []
        self._record_step(scheduled, sampled, prefill_tokens, outputs, time.perf_counter() - started)
        return outputs

    def _copy_blocks(self) -> None:
        """The block manager's queued copies (copy on write of forked samples' blocks), before
        anything writes into the copies."""
        self.model_runner.copy_blocks(self.scheduler.block_manager.take_copies())

    def _execute(self, scheduled: list[ScheduledSequence]) -> list[SampledTokens]:
        """The step's tokens. A fault is narrowed down to the request(s) causing it: the batch is
        halved and each half run alone until a faulty request runs by itself; it fails with the
        error (finish reason `error`, every sample of it) and the others' tokens stand. A lost
        tensor-parallel rank is no request's fault: it goes up."""
        if not scheduled:
            return []
        if any(s.seq.is_finished for s in scheduled):  # samples of a request failed in another half
            live = [i for i, s in enumerate(scheduled) if not s.seq.is_finished]
            sampled = [SampledTokens() for _ in scheduled]
            for i, result in zip(live, self._execute([scheduled[i] for i in live]), strict=True):
                sampled[i] = result
            return sampled
        try:
            return self.model_runner.execute(scheduled)
        except TensorParallelError:
            raise
        except Exception as e:
            logger.warning("engine step failed with %d requests; isolating the cause: %s", len(scheduled), e)
            if len(scheduled) == 1:
                self._fail_request(scheduled[0].seq, e)
                return [SampledTokens()]
            half = len(scheduled) // 2
            sampled = self._execute(scheduled[:half]) + self._execute(scheduled[half:])
            self.model_runner.last_plan = None  # the halves' plans: no drafts from this step
            return sampled

    def _propose(self, scheduled: list[ScheduledSequence]) -> None:
        """Speculative decoding's drafts for the next step; a drafter fault costs only the drafts."""
        try:
            self.model_runner.propose(scheduled)
        except TensorParallelError:
            raise
        except Exception:
            logger.exception("drafting failed; the next step verifies no drafts")
            for item in scheduled:
                item.seq.draft_token_ids = []

    def _fail_request(self, seq: Sequence, error: Exception) -> None:
        logger.error("request %s failed in the engine: %s: %s", seq.request_id, type(error).__name__, error)
        output = self._finish_request(seq.request_id, "error")
        output.error = f"{type(error).__name__}: {error}"
        self._aborted.append(output)

    def _finish_request(self, request_id: str, reason: str, index: int | None = None) -> RequestOutput:
        """End every unfinished sample of the request (or only sample `index`) now: blocks freed, the
        news to report."""
        for sample in self.output_processor.states[request_id].samples.values():
            if index in (None, sample.seq.index):
                self.scheduler.finish(sample.seq, reason)
        return self.output_processor.abort(request_id, index)

    def snapshot(self) -> EngineSnapshot:
        """Running and waiting requests, KV blocks, prefix-cache hits and the running totals; safe
        to call from another thread (the metrics endpoint, Celery's stats)."""
        return snapshot(self.scheduler, self.totals)

    def _record_step(
        self,
        scheduled: list[ScheduledSequence],
        sampled: list[SampledTokens],
        prefill_tokens: int,
        outputs: list[RequestOutput],
        seconds: float,
    ) -> None:
        verified = [(s, t) for s, t in zip(scheduled, sampled, strict=True) if s.draft_token_ids]
        self.last_step = StepStats(
            num_seqs=len(scheduled),
            num_tokens=sum(s.num_new_tokens for s in scheduled),
            num_prefill_tokens=prefill_tokens,
            num_generated_tokens=sum(len(c.new_token_ids) for o in outputs for c in o.outputs),
            num_draft_tokens=sum(len(s.draft_token_ids) for s, _ in verified),
            num_accepted_tokens=sum(len(t.token_ids) - 1 for _, t in verified),
            seconds=seconds,
        )
        self.totals.record(self.last_step, [o.finish_reason or "unknown" for o in outputs if o.finished])

    def abort_request(self, request_id: str) -> None:
        """Stop a request now, every sample of it: their blocks are freed and the next step() reports
        them as `abort`."""
        if request_id in self.output_processor.states:
            self._aborted.append(self._finish_request(request_id, "abort"))

    def abort_sample(self, request_id: str, index: int) -> bool:
        """Stop one sample of a request now (`abort`, reported by the next step()); its blocks are
        freed and the other samples go on; the last one to finish finishes the request. Samples
        exist from the request's first output on: False, and nothing done, for an unknown request,
        a sample not forked yet, or one already finished."""
        state = self.output_processor.states.get(request_id)
        sample = state.samples.get(index) if state else None
        if sample is None or sample.result is not None or sample.seq.fork_pending:
            return False
        self._aborted.append(self._finish_request(request_id, "abort", index))
        return True

    def close(self) -> None:
        """Stop the tensor-parallel worker ranks (nothing to do with one rank). Also runs when the
        engine is collected and at interpreter exit; the engine cannot step afterwards."""
        self.model_runner.close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        wanted = self.config.max_model_len or limit
        if wanted > limit:
            raise ConfigError(f"max_model_len {wanted} exceeds the model's max_position_embeddings {limit}")
        return wanted

    def _eos_token_ids(self) -> list[int]:
        """Every id that ends generation: the tokenizer's EOS, config.json's and generation_config's."""
        ids = [*self.tokenizer.eos_token_ids, *self.model_config.eos_token_ids]
        generation_config = self.model_path / "generation_config.json" if self.model_path.is_dir() else None
        if generation_config and generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else list(eos or [])
        return list(dict.fromkeys(ids))


def _is_prefill(item: ScheduledSequence) -> bool:
    """A prompt chunk (or recomputation after a preemption, or a forced tag): anything but one
    sequence computing the single token it sampled last step (with any drafts it verifies)."""
    return (
        item.num_new_tokens - len(item.draft_token_ids) > 1 or item.seq.num_computed_tokens < item.seq.num_prompt_tokens
    )
