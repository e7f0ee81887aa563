"""The engine host: one per worker process. It owns the model and a single loop thread that
drains new requests into the engine, steps it while anything is running, and routes every step's
outputs to the waiting job threads. All jobs in flight in the process share each forward pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from ponder.engine.config import EngineConfig, SamplingParams
from ponder.engine.errors import RequestFailed
from ponder.engine.outputs import RequestOutput, TokenLogprob
from ponder.engine.runtime.llm_engine import LLMEngine

logger = logging.getLogger("ponder.worker")


@dataclass
class StepEvent:
    output: RequestOutput | None
    batch_size: int  # sequences in the forward pass that produced it
    error: BaseException | None = None


class RequestHandle:
    """What a job thread holds: the stream of its request's step outputs."""

    def __init__(self, request_id: str, job_id: str | None = None) -> None:
        self.request_id = request_id
        self.job_id = job_id  # the job this request is one attempt of
        self.events: queue.SimpleQueue[StepEvent] = queue.SimpleQueue()

    def get(self, timeout: float) -> StepEvent | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def get_all(self, timeout: float) -> list[StepEvent]:
        """Every event waiting (at least one, if one comes within `timeout`): a job thread that fell
        behind the engine catches up in one pass instead of one event per stream write and flush."""
        first = self.get(timeout)
        if first is None:
            return []
        events = [first]
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                return events


class EngineHost:
    def __init__(self, model: str, config: EngineConfig, heartbeat=None, heartbeat_seconds: float = 5.0) -> None:
        self.engine = LLMEngine(model, config)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}
        self._wake = threading.Event()
        self._heartbeat = heartbeat  # called every few seconds from the loop: "this worker is alive"
        self._heartbeat_seconds = heartbeat_seconds
        self._thread = threading.Thread(target=self._loop, name="engine-host", daemon=True)
        self._thread.start()

    # -- job threads --------------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        job_id: str | None = None,
        output_token_ids: list[int] | None = None,
        cache_salt: str | None = None,
        output_logprobs: list[TokenLogprob] | None = None,
    ) -> RequestHandle:
        """`output_token_ids`: resume from what an earlier attempt generated (`output_logprobs`: their
        values, when kept); `cache_salt`: whose prefix-cache blocks it may share (LLMEngine.add_request)."""
        handle = RequestHandle(request_id, job_id)
        self._inbox.put(("add", handle, prompt_token_ids, params, output_token_ids, cache_salt, output_logprobs))
        self._wake.set()
        return handle

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def abort_sample(self, request_id: str, index: int) -> None:
        """Stop one sample of a request (its blocks freed, reported `abort`); the others go on
        (LLMEngine.abort_sample; an unknown, unforked or finished sample is ignored)."""
        self._inbox.put(("abort_sample", request_id, index))
        self._wake.set()

    def abort_job(self, job_id: str) -> None:
        """Abort whatever attempt of the job runs here (a cancellation names the job, not the attempt)."""
        self._inbox.put(("abort_job", job_id))
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Jobs handed to the engine and not finished yet."""
        return len(self._handles)

    def status(self) -> dict:
        """For the heartbeat: what this engine is doing."""
        blocks = self.engine.scheduler.block_manager
        return {
            "in_flight": self.in_flight,
            "free_blocks": blocks.num_free_blocks,
            "total_blocks": blocks.num_blocks,
            "model": str(self.engine.model_path.name),
        }

    # -- the loop thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        last_beat = 0.0
        while True:  # for the life of the process (a daemon thread)
            if self._heartbeat and time.monotonic() - last_beat >= self._heartbeat_seconds:
                self._beat()
                last_beat = time.monotonic()
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=min(1.0, self._heartbeat_seconds))
                self._wake.clear()
                continue
            self._step()

    def _beat(self) -> None:
        try:
            self._heartbeat()
        except Exception:  # a missed heartbeat only delays readiness; never stop the engine for it
            logger.exception("heartbeat failed")

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "add":
                self._add(*message[1:])
            elif message[0] == "abort_sample":
                if message[1] in self._handles:
                    self.engine.abort_sample(message[1], message[2])
            elif message[0] == "abort_job":
                for request_id, handle in list(self._handles.items()):
                    if handle.job_id == message[1]:
                        self.engine.abort_request(request_id)
            elif message[1] in self._handles:
                self.engine.abort_request(message[1])

    def _add(
        self,
        handle: RequestHandle,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_token_ids: list[int] | None,
        cache_salt: str | None,
        output_logprobs: list[TokenLogprob] | None,
    ) -> None:
        try:
            self.engine.add_request(
                handle.request_id, prompt_token_ids, params, output_token_ids, cache_salt, output_logprobs
            )
        except Exception as e:  # rejected (too long, duplicate id): the job fails, the engine goes on
            handle.events.put(StepEvent(None, 0, e))
            return
        self._handles[handle.request_id] = handle

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a fault the engine could not pin on requests: all in flight fail, not the process
            logger.exception("engine step failed; failing %d requests", len(self._handles))
            for request_id, failed in list(self._handles.items()):
                self.engine.abort_request(request_id)
                failed.events.put(StepEvent(None, 0, e))
            self._handles.clear()
            while self.engine.has_unfinished_requests():
                self.engine.step()
            return
        batch_size = self.engine.last_step.num_seqs
        for output in outputs:
            handle = self._handles.get(output.request_id)
            if handle is None:
                continue
            fault = RequestFailed(output.error) if output.error else None
            handle.events.put(StepEvent(None if fault else output, batch_size, fault))
            if output.finished:
                del self._handles[output.request_id]
