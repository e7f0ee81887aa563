"""Service load: `POST /v1/jobs` latency at a steady request rate against the real stack (uvicorn
API, Celery inference worker, beat, Redis, SQLite or PostgreSQL), and how soon a submitted job
starts when a worker slot is free.

Open loop: requests leave on a fixed schedule whatever the earlier ones are doing, so a slow
server shows up as latency, not as a lower rate. Side by side, in the same run and at the same
rate, `GET /healthz` gives the floor of the HTTP stack itself; the ratio says what job creation
(auth, chat template, tokenizing, insert + commit, enqueue) costs on top.

    python benchmarks/service_load.py [--rate 100] [--seconds 30] [--database sqlite|postgresql]
    python benchmarks/service_load.py --rate 25 50 100 200 400 --seconds 5   # a sweep: where is the knee?

Overload must never be a 500 (docs/operations.md#capacity): every answer is counted by status
(0: no answer within 30 s, so a stuck server cannot hang the benchmark), refusals must be 503 or
429 with Retry-After, and every job answered 202 must exist and succeed, and no other. The knee is
the highest rate of the sweep at which every request was answered 202 with a p99 within
`--knee-p99-ms`.

`--batch-lines N` (10000 when given alone) measures the Batch API instead: an N-line file uploaded
through `POST /v1/files`, `POST /v1/batches`, the time until the batch is `in_progress` (every line
checked and made a job by the batches worker's validation), and the API's and the batches
worker's resident memory before and after (uploads and validation stream the file: neither should
grow with N); then, for up to `--batch-wait` seconds, how far the batch gets.

`--with-batch N` (50000 when given alone) measures the load twice in one run: first as above, then
again while an N-line batch runs (validated, its lines filling every slot direct jobs leave), with
submit -> started measured again meanwhile; it prints both and their ratios (the target: within
20%, direct work is not slowed by a batch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.stack import (  # noqa: E402  (the same real-process stack the end-to-end tests run)
    database,
    make_stack,
    start_redis,
)

BODY = {"messages": [{"role": "user", "content": "Load test: reply with one word."}], "max_tokens": 1}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class RawHttpPool:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams. httpx spends milliseconds of CPU
    per request; on a two-core machine shared with the server that would measure the client."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def encode(self, method: str, path: str, body: dict | None) -> bytes:
        payload = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.headers}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        return (head + "\r\n").encode() + payload

    async def request(self, raw: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); status 0 when no answer came within `timeout` (the benchmark
        never hangs on a server that stopped answering)."""
        try:
            return await asyncio.wait_for(self._request(raw), timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            return 0, {}, b""  # that connection is dropped, not reused

    async def _request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(raw)
            status_line = await reader.readline()
        except ConnectionResetError:
            status_line = b""
        if not status_line:  # the server closed an idle keep-alive connection: a fresh one
            writer.close()
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(raw)
            status_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(status_line.split()[1]), headers, body

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def open_loop(pool: RawHttpPool, method: str, path: str, rate: float, seconds: float, body=None) -> dict:
    """Fire `rate` requests per second for `seconds`: latencies (ms), statuses, the ids of the jobs
    answered 202, and how many refusals (429/503) came without a Retry-After."""
    raw = pool.encode(method, path, body)
    result: dict = {"latencies": [], "statuses": {}, "accepted": [], "no_retry_after": 0, "trace": []}

    async def one() -> None:
        start = time.perf_counter()
        status, headers, answer = await pool.request(raw)
        result["latencies"].append((time.perf_counter() - start) * 1000)
        result["trace"].append((round(time.time() - (time.perf_counter() - start), 4), result["latencies"][-1], status))
        result["statuses"][status] = result["statuses"].get(status, 0) + 1
        if status == 202:
            result["accepted"].append(json.loads(answer)["id"])
        elif status in (429, 503) and not headers.get("retry-after", "").isdigit():
            result["no_retry_after"] += 1

    tasks = []
    begin = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = begin + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return result


async def measure_load(stack, rate: float, seconds: float) -> dict:
    """`GET /healthz` then `POST /v1/jobs`, each at `rate` for `seconds`."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    pool = RawHttpPool(host, int(port), {"Authorization": f"Bearer {stack.api_key}"})
    try:
        await open_loop(pool, "GET", "/healthz", 20, 1)  # warm up connections
        health = await open_loop(pool, "GET", "/healthz", rate, seconds)
        posts = await open_loop(pool, "POST", "/v1/jobs", rate, seconds, BODY)
    finally:
        await pool.close()
    statuses = posts["statuses"]
    return {
        "rate": rate,
        "requests": len(posts["latencies"]),
        "statuses": dict(sorted(statuses.items())),
        "non_202": sum(n for status, n in statuses.items() if status != 202),
        "status_500": sum(n for status, n in statuses.items() if status >= 500 and status != 503),
        "timeouts": statuses.get(0, 0),
        "no_retry_after": posts["no_retry_after"],
        "accepted": posts["accepted"],
        "trace": posts["trace"],  # (sent at, epoch s; latency ms; status) per POST
        "post_p50_ms": round(statistics.median(posts["latencies"]), 1),
        "post_p99_ms": round(percentile(posts["latencies"], 99), 1),
        "healthz_p50_ms": round(statistics.median(health["latencies"]), 1),
        "healthz_p99_ms": round(percentile(health["latencies"], 99), 1),
    }


def knee(sweep: list[dict], p99_ms: float) -> float | None:
    """The highest rate at which every request was answered 202 within `p99_ms` at the 99th percentile."""
    good = [load["rate"] for load in sweep if load["non_202"] == 0 and load["post_p99_ms"] <= p99_ms]
    return max(good) if good else None


def accepted_jobs(database_url: str, accepted: list[str]) -> dict[str, int]:
    """The 202'd jobs by status in the database, plus `missing` (202'd, not stored) and `extra` (stored
    for a request that was not answered 202): both must be 0."""
    from sqlmodel import Session, select

    from ponder.service.db import database_engine
    from ponder.service.tables import Job

    with Session(database_engine(database_url)) as session:
        rows = {str(job_id): status for job_id, status in session.exec(select(Job.id, Job.status)).all()}
    counts: dict[str, int] = {}
    for job_id in accepted:
        status = rows.get(job_id, "missing")
        counts[status] = counts.get(status, 0) + 1
    counts["extra"] = len(set(rows) - set(accepted))
    return counts


def wait_drained(stack, timeout: float = 600) -> None:
    """Let the worker finish the load's jobs, so the next measurement finds a free slot."""
    with stack.client() as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            page = client.get("/v1/jobs", params={"status": "queued", "limit": 1}).json()
            running = client.get("/v1/jobs", params={"status": "running", "limit": 1}).json()
            if not page["data"] and not running["data"]:
                return count_unsuccessful(client)
            time.sleep(1)
    raise RuntimeError("the worker did not drain the queue")


def count_unsuccessful(client) -> int:
    """The load's jobs must all have run: a worker that fails them fast would flatter the figures."""
    total = 0
    for status in ("failed", "cancelled", "expired"):
        total += len(client.get("/v1/jobs", params={"status": status, "limit": 100}).json()["data"])
    return total


def measure_started(stack, samples: int) -> dict:
    """Submit one job at a time into an idle worker: created_at -> started_at, server clocks."""
    delays = []
    with stack.client() as client:
        for _ in range(samples):
            job = client.post("/v1/jobs", json=BODY).json()
            while True:
                current = client.get(f"/v1/jobs/{job['id']}").json()
                if current["status"] not in ("queued", "running"):
                    break
                time.sleep(0.02)
            timings = current["timings"]
            created = _parse(timings["created_at"])
            started = _parse(timings["started_at"])
            delays.append((started - created) * 1000)
    return {"started_p50_ms": round(statistics.median(delays), 1), "started_p99_ms": round(percentile(delays, 99), 1)}


def _parse(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


def batch_file(path: Path, lines: int, model: str, max_tokens: int = 1) -> int:
    """An N-line batch input of distinct chat requests; returns its size in bytes."""
    with path.open("w") as out:
        for i in range(lines):
            messages = [{"role": "user", "content": f"Batch line {i}: one word."}]
            body = {"model": model, "messages": messages, "max_tokens": max_tokens}
            line = {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            out.write(json.dumps(line) + "\n")
    return path.stat().st_size


def measure_batch(stack, lines: int, model: str, wait: float) -> dict:
    """Upload, create, time to in_progress, memory of the API and beat before and after; then the
    batch's progress for up to `wait` seconds."""
    api, batches = stack.processes["api"].pid, stack.processes["batches-worker"].pid
    path = stack.workdir / "batch.jsonl"
    size = batch_file(path, lines, model)
    with stack.client() as client:
        warm_up = stack.workdir / "warm-up.jsonl"  # routes and the validation's tokenizer loaded before
        batch_file(warm_up, 1, model)
        with warm_up.open("rb") as file:
            uploaded = client.post("/v1/files", files={"file": ("warm-up.jsonl", file)}, data={"purpose": "batch"})
        body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch = client.post("/v1/batches", json=body).json()
        while client.get(f"/v1/batches/{batch['id']}").json()["status"] == "validating":
            time.sleep(0.1)
        before = {"api": rss_mib(api), "batches": rss_mib(batches)}
        start = time.perf_counter()
        with path.open("rb") as file:  # httpx streams a file object's multipart body
            uploaded = client.post("/v1/files", files={"file": ("batch.jsonl", file)}, data={"purpose": "batch"})
        upload_s = time.perf_counter() - start
        assert uploaded.status_code == 200, uploaded.text
        after_upload = rss_mib(api)
        body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        start = time.perf_counter()
        batch = client.post("/v1/batches", json=body).json()
        while batch["status"] == "validating":
            time.sleep(0.1)
            batch = client.get(f"/v1/batches/{batch['id']}").json()
        in_progress_s = time.perf_counter() - start
        assert batch["status"] == "in_progress", batch
        after = {"api": rss_mib(api), "batches": rss_mib(batches)}
        while (
            batch["status"] not in ("completed", "failed", "cancelled", "expired")
            and time.perf_counter() - start < wait
        ):
            time.sleep(1)
            batch = client.get(f"/v1/batches/{batch['id']}").json()
        elapsed = time.perf_counter() - start
    counts = batch["request_counts"]
    return {
        "batch_lines": lines,
        "file_mib": round(size / 2**20, 2),
        "upload_s": round(upload_s, 2),
        "in_progress_s": round(in_progress_s, 2),
        "lines_per_s_validated": round(lines / in_progress_s),
        "api_rss_before_mib": before["api"],
        "api_rss_after_upload_mib": after_upload,
        "api_rss_after_mib": after["api"],
        "batches_rss_before_mib": before["batches"],
        "batches_rss_after_mib": after["batches"],
        "final_status": batch["status"],
        "completed": counts["completed"],
        "failed": counts["failed"],
        "elapsed_s": round(elapsed, 1),
    }


def run_batch(args, stack) -> None:
    figures = measure_batch(stack, args.batch_lines, args.model, args.batch_wait)
    print(
        f"{figures['batch_lines']} lines ({figures['file_mib']} MiB): uploaded in {figures['upload_s']} s, "
        f"in_progress after {figures['in_progress_s']} s ({figures['lines_per_s_validated']} lines/s)"
    )
    print(
        f"API RSS {figures['api_rss_before_mib']} -> {figures['api_rss_after_upload_mib']} (uploaded) -> "
        f"{figures['api_rss_after_mib']} MiB; batches worker RSS {figures['batches_rss_before_mib']} -> "
        f"{figures['batches_rss_after_mib']} MiB"
    )
    print(
        f"after {figures['elapsed_s']} s: {figures['final_status']}, {figures['completed']} completed, "
        f"{figures['failed']} failed"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(
        f"RESULT service_load_batch lines={figures['batch_lines']} in_progress_s={figures['in_progress_s']} "
        f"api_rss_mib={figures['api_rss_before_mib']}->{figures['api_rss_after_mib']} "
        f"batches_rss_mib={figures['batches_rss_before_mib']}->{figures['batches_rss_after_mib']} "
        f"status={figures['final_status']} completed={figures['completed']} elapsed_s={figures['elapsed_s']}"
    )


def run_with_batch(args, stack, database_url: str, alone: dict, started_alone: dict) -> None:
    """The last rate again, and submit -> started, while an N-line batch runs; then the ratios."""
    path = stack.workdir / "big-batch.jsonl"
    batch_file(path, args.with_batch, args.model, args.batch_max_tokens)
    with stack.client() as client:
        with path.open("rb") as file:
            uploaded = client.post("/v1/files", files={"file": ("big.jsonl", file)}, data={"purpose": "batch"})
        body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch = client.post("/v1/batches", json=body).json()
        while batch["status"] == "validating":  # measured once its lines run, the validation done
            time.sleep(0.5)
            batch = client.get(f"/v1/batches/{batch['id']}").json()
        load = asyncio.run(measure_load(stack, alone["rate"], args.seconds))
        started = measure_started(stack, args.started_samples)
        running = client.get(f"/v1/batches/{batch['id']}").json()
        client.post(f"/v1/batches/{batch['id']}/cancel")
    statuses = direct_jobs(database_url, load["accepted"], timeout=600)
    print(
        f"with the batch running ({running['status']}, {running['request_counts']['completed']} lines done): "
        f"POST p50 {load['post_p50_ms']} ms, p99 {load['post_p99_ms']} ms, by status {load['statuses']}; "
        f"submit -> started p50 {started['started_p50_ms']} ms; the 202'd jobs by status: {statuses}"
    )
    p99_ratio = round(load["post_p99_ms"] / alone["post_p99_ms"], 2)
    started_ratio = round(started["started_p50_ms"] / started_alone["started_p50_ms"], 2)
    print(
        f"RESULT service_load_with_batch lines={args.with_batch} line_max_tokens={args.batch_max_tokens} "
        f"rate={alone['rate']:g} "
        f"post_p99_ms={alone['post_p99_ms']}->{load['post_p99_ms']} p99_ratio={p99_ratio} "
        f"started_p50_ms={started_alone['started_p50_ms']}->{started['started_p50_ms']} "
        f"started_ratio={started_ratio} s202={load['statuses'].get(202, 0)} "
        f"succeeded={statuses.get('succeeded', 0)} batch_lines_done={running['request_counts']['completed']}"
    )


def direct_jobs(database_url: str, accepted: list[str], timeout: float) -> dict[str, int]:
    """The 202'd jobs by status once none is queued or running (they go before the batch's)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = accepted_jobs(database_url, accepted)
        counts.pop("extra")  # the batch's own jobs
        if not {"queued", "running"} & set(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, nargs="+", default=[100], help="one rate, or several: a sweep")
    parser.add_argument("--knee-p99-ms", type=float, default=1000, help="the knee's p99 bound")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--started-samples", type=int, default=50)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--worker-nice", type=int, default=0, help="CPU priority of the workers and beat")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--trace", help="write each POST's send time (epoch s), latency (ms) and status here")
    parser.add_argument("--batch-lines", type=int, nargs="?", const=10_000, help="measure a batch of N lines instead")
    parser.add_argument("--with-batch", type=int, nargs="?", const=50_000, help="measure again while N lines run")
    parser.add_argument("--batch-max-tokens", type=int, default=1, help="each --with-batch line's max_tokens")
    parser.add_argument("--batch-wait", type=float, default=300, help="seconds to follow the batch after in_progress")
    parser.add_argument("--redis-db", type=int, default=12, help="a database of the machine's Redis, flushed")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ponder-load-"))
    cleanup = ExitStack()  # a PostgreSQL database is dropped at the end
    database_url = cleanup.enter_context(database(args.database, workdir, unavailable=sys.exit))
    redis_url, redis_process = start_redis(workdir, db=args.redis_db)  # not a test run's database
    stack = make_stack(workdir, database_url, redis_url, model=args.model, progress_interval_seconds=2)
    try:
        # Workers run on GPU hosts of their own in production; here they share the two cores with
        # the API as equals (--worker-nice N lowers their CPU priority to emulate separate hosts).
        stack.start("api")
        stack.start("worker", nice=args.worker_nice)
        stack.start("beat", nice=args.worker_nice)
        if args.batch_lines or args.with_batch:
            stack.start("batches-worker", nice=args.worker_nice)
        stack.wait_ready()
        if args.batch_lines:
            return run_batch(args, stack)
        sweep = []
        for rate in args.rate:
            load = asyncio.run(measure_load(stack, rate, args.seconds))
            sweep.append(load)
            if args.trace:
                with open(args.trace, "a") as trace:
                    trace.writelines(f"{sent:.4f} {ms:.1f} {status}\n" for sent, ms, status in load["trace"])
            print(
                f"POST /v1/jobs at {rate:.0f}/s for {args.seconds:.0f} s ({load['requests']} requests, by status "
                f"{load['statuses']}, {load['no_retry_after']} refusals without Retry-After): "
                f"p50 {load['post_p50_ms']} ms, p99 {load['post_p99_ms']} ms; "
                f"GET /healthz p50 {load['healthz_p50_ms']} ms, p99 {load['healthz_p99_ms']} ms"
            )
            print(
                f"RESULT service_load_rate rate={rate:g} requests={load['requests']} "
                + " ".join(f"s{status}={n}" for status, n in load["statuses"].items())
                + f" post_p50_ms={load['post_p50_ms']} post_p99_ms={load['post_p99_ms']}"
                f" healthz_p99_ms={load['healthz_p99_ms']}"
            )
        unsuccessful = wait_drained(stack)
        jobs = accepted_jobs(database_url, [job_id for load in sweep for job_id in load["accepted"]])
        print(f"jobs of the load that did not succeed: {unsuccessful}; the 202'd jobs by status now: {jobs}")
        if unsuccessful or set(jobs) - {"succeeded", "extra"} or jobs["extra"]:
            raise SystemExit("some 202'd job did not succeed, or a refused request made a job")
        if any(load["status_500"] or load["timeouts"] or load["no_retry_after"] for load in sweep):
            raise SystemExit("an answer was a 5xx other than 503, a timeout, or a refusal without Retry-After")
        started = measure_started(stack, args.started_samples)
        print(f"submit -> started with a free worker slot: p50 {started['started_p50_ms']} ms")
        if args.with_batch:
            return run_with_batch(args, stack, database_url, sweep[-1], started)
    finally:
        stack.stop_all()
        if redis_process is not None:
            redis_process.terminate()
        cleanup.close()
    load = sweep[-1]
    figures = {
        "rates": args.rate,
        "seconds": args.seconds,
        "database": args.database,
        "worker_nice": args.worker_nice,
        "knee": knee(sweep, args.knee_p99_ms),
        "sweep": [{k: v for k, v in one.items() if k not in ("accepted", "trace")} for one in sweep],
        **started,
    }
    figures["post_vs_healthz_p99"] = round(load["post_p99_ms"] / max(load["healthz_p99_ms"], 0.1), 2)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(
        f"RESULT service_load knee_rate={figures['knee']} rate={load['rate']:g} post_p99_ms={load['post_p99_ms']} "
        f"started_p50_ms={started['started_p50_ms']} healthz_p99_ms={load['healthz_p99_ms']} "
        f"ratio={figures['post_vs_healthz_p99']} status_500={sum(one['status_500'] for one in sweep)} "
        f"accepted={sum(len(one['accepted']) for one in sweep)} accepted_succeeded={jobs.get('succeeded', 0)}"
    )


if __name__ == "__main__":
    main()
