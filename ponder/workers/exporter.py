"""An inference worker's metrics: its engine's snapshot as Prometheus metrics on a port of its own,
and as a summary in Celery's `inspect stats` (Flower's worker page, tab "Other").

Everything is read from the engine at scrape time (a custom collector), so nothing is counted
twice and the engine loop pays nothing per step beyond its own totals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from celery import bootsteps
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ponder.engine.stats import STEP_SECONDS_BUCKETS, EngineSnapshot
from ponder.workers.engine_host import EngineHost

logger = logging.getLogger("ponder.worker")


class EngineCollector(Collector):
    def __init__(self, host: Callable[[], EngineHost], worker: str) -> None:
        self._host, self._worker = host, worker

    def collect(self) -> Iterator[Metric]:
        host = self._host()
        s = host.engine.snapshot()
        info = GaugeMetricFamily("ponder_worker_info", "This worker process and its model", labels=["worker", "model"])
        info.add_metric([self._worker, host.engine.model_path.name], 1)
        yield info
        yield GaugeMetricFamily("ponder_worker_jobs_in_flight", "Jobs in the engine, not finished", host.in_flight)
        yield from _engine_metrics(s)

    def describe(self) -> list:
        return []  # no describe-time collect: the engine may not be built yet when this registers


def _engine_metrics(s: EngineSnapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily("ponder_engine_requests_running", "Sequences in the running batch", s.running)
    yield GaugeMetricFamily("ponder_engine_requests_waiting", "Sequences waiting for admission", s.waiting)
    yield GaugeMetricFamily("ponder_engine_kv_cache_blocks_total", "KV-cache blocks", s.blocks_total)
    yield GaugeMetricFamily("ponder_engine_kv_cache_blocks_used", "KV-cache blocks held by sequences", s.blocks_used)
    yield GaugeMetricFamily("ponder_engine_kv_cache_usage_ratio", "Used / total KV-cache blocks", s.kv_cache_usage)
    yield GaugeMetricFamily(
        "ponder_engine_prefix_cache_hit_ratio", "Prefix-cache hits / prompt tokens looked up", s.prefix_cache_hit_rate
    )
    counters = [
        ("ponder_engine_prefix_cache_queried_tokens", "Prompt tokens looked up in the cache", s.prefix_queried_tokens),
        ("ponder_engine_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", s.prefix_hit_tokens),
        ("ponder_engine_prefill_tokens", "Tokens computed in prompt chunks (and recomputation)", s.prefill_tokens),
        ("ponder_engine_decode_tokens", "Tokens generated (the requests' completion tokens)", s.generated_tokens),
        ("ponder_engine_preemptions", "Sequences preempted for lack of KV blocks (recomputed later)", s.preemptions),
        ("ponder_engine_steps", "Engine steps (batched forward passes)", s.steps),
        ("ponder_engine_spec_decode_draft_tokens", "Speculative decoding: draft tokens verified", s.draft_tokens),
        ("ponder_engine_spec_decode_accepted_tokens", "Speculative decoding: draft tokens accepted", s.accepted_tokens),
    ]
    for name, documentation, value in counters:
        yield CounterMetricFamily(name, documentation, value=value)
    finished = CounterMetricFamily("ponder_engine_requests_finished", "Requests finished, by reason", labels=["reason"])
    for reason, count in sorted(({"stop": 0, "length": 0, "abort": 0} | s.finished).items()):
        finished.add_metric([reason], count)  # every reason from the start: rate() needs the zero
    yield finished
    yield _step_histogram(s)


def _step_histogram(s: EngineSnapshot) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, count in zip([*map(str, STEP_SECONDS_BUCKETS), "+Inf"], s.step_buckets, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(
        "ponder_engine_step_duration_seconds", "Wall time of one engine step", buckets=buckets, sum_value=s.step_seconds
    )


def start_metrics_server(host: Callable[[], EngineHost], worker: str, address: str, port: int) -> None:
    """Serve this process's metrics at http://address:port/metrics (port 0: no endpoint)."""
    if not port:
        return
    registry = CollectorRegistry()
    registry.register(EngineCollector(host, worker))
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as e:  # one port per worker process: a second worker on the host needs its own
        raise OSError(
            f"worker metrics on {address}:{port}: {e.strerror or e}; give each worker process its own "
            "PONDER_WORKER_METRICS_PORT (0 turns the endpoint off)"
        ) from None
    logger.info("worker metrics at http://%s:%d/metrics", address, port)


def summary(host: EngineHost) -> dict:
    """A few headline numbers, flat so that Flower's worker page lists them one per row."""
    s = host.engine.snapshot()
    return {
        "ponder_model": host.engine.model_path.name,
        "ponder_jobs_in_flight": host.in_flight,
        "ponder_engine_running": s.running,
        "ponder_engine_waiting": s.waiting,
        "ponder_kv_cache_blocks": f"{s.blocks_used}/{s.blocks_total} ({s.kv_cache_usage:.0%})",
        "ponder_prefix_cache_hit_rate": round(s.prefix_cache_hit_rate, 4),
        "ponder_prefill_tokens": s.prefill_tokens,
        "ponder_decode_tokens": s.generated_tokens,
        "ponder_preemptions": s.preemptions,
        "ponder_steps": s.steps,
        "ponder_step_seconds_mean": round(s.step_seconds / s.steps, 6) if s.steps else 0.0,
    }


class EngineStats(bootsteps.StartStopStep):
    """Adds `summary()` to `celery inspect stats`, which Flower's worker page shows. Registered by
    `ponder worker` (inference workers only)."""

    label = "ponder engine stats"

    def info(self, worker) -> dict:
        from ponder.workers.tasks import engine_host  # built before the worker starts: no model load here

        try:
            return summary(engine_host())
        except Exception:  # stats must answer whatever the engine is doing
            logger.exception("engine summary failed")
            return {}
