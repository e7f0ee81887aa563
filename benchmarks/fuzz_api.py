"""Fuzz run: schemathesis' command line (every phase: the schema's examples, boundary coverage,
random fuzzing, stateful sequences) against a real uvicorn API process on SQLite and Redis, with a
real API key, checking that no answer is a server error and that every answer matches the OpenAPI
schema (a 2xx its model, anything else the error shape: ponder/service/errors.py:document_errors).

No worker runs. A client thread here cancels every queued job, as its owner would, so the routes
that wait for a job's end (a chat completion, a response that is not `background`) are answered.
/readyz is left out: without a worker it answers its documented 503 (tests/service/test_fuzz_api.py
covers it).

Requests are counted from schemathesis' HAR report (one entry per request answered). Server errors
are counted twice over, as the client and the server see them: `server_errors`, the 5xx answers;
`unhandled`, the exceptions the API logged (a streaming answer that breaks after its 200 started is
one of these, and no 5xx). Both are listed, with the tracebacks.

    python benchmarks/fuzz_api.py [--max-examples 300] [--workers 2] [--max-time SECONDS]

prints `RESULT fuzz requests=N server_errors=E ...`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.stack import make_stack, start_redis  # noqa: E402  (the real-process stack the e2e tests run)

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def cancel_queued(client: httpx.Client, stop: threading.Event) -> int:
    """Cancel every queued job of the key until `stop`; returns how many requests it made."""
    sent = 0
    while not stop.wait(0.2):  # the waiting routes look at the row every 2 s
        try:
            page = client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()
            sent += 1
            for job in page.get("data", []):
                client.post(f"/v1/jobs/{job['id']}/cancel")  # 409 if it ended meanwhile
                sent += 1
        except httpx.HTTPError:
            pass  # the API is busy or restarting: the next round tries again
    return sent


def run(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="ponder-fuzz-"))
    redis_url, redis_process = start_redis(workdir)
    stack = make_stack(workdir, f"sqlite:///{workdir / 'ponder.db'}", redis_url, docs_enabled="true")
    stack.start("api")
    har = workdir / "fuzz.har"
    stop = threading.Event()
    cancels: list[int] = []
    try:
        stack.wait_api()
        with stack.client() as client:
            canceller = threading.Thread(target=lambda: cancels.append(cancel_queued(client, stop)), daemon=True)
            canceller.start()
            command = [
                str(SCHEMATHESIS),
                "run",
                f"{stack.base_url}/openapi.json",
                "--header",
                f"Authorization: Bearer {stack.api_key}",
                "--checks",
                "not_a_server_error,response_schema_conformance",
                "--exclude-path",
                "/readyz",
                "--max-examples",
                str(args.max_examples),
                "--workers",
                str(args.workers),
                "--seed",
                str(args.seed),
                "--request-timeout",
                "60",
                "--report",
                "har",
                "--report-har-path",
                str(har),
                "--suppress-health-check",
                "all",
                "--no-color",
            ]
            if args.max_time:
                command += ["--max-time", str(args.max_time)]
            started = time.monotonic()
            output = subprocess.run(command, capture_output=True, text=True)
            seconds = time.monotonic() - started
            stop.set()
            canceller.join(timeout=30)
        (workdir / "schemathesis.log").write_text(output.stdout + output.stderr)
    finally:
        stop.set()
        stack.stop_all()
        if redis_process is not None:
            redis_process.terminate()
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses = Counter(entry["response"]["status"] for entry in entries)
    errors = Counter(
        (entry["request"]["method"], _path(entry["request"]["url"]), entry["response"]["status"])
        for entry in entries
        if entry["response"]["status"] >= 500
    )
    tracebacks = re.findall(r"unhandled error on .*?(?=\n(?:INFO|ERROR|WARNING)|\Z)", stack.log("api"), re.S)
    return {
        "requests": len(entries),
        "server_errors": sum(errors.values()),
        "seconds": seconds,
        "statuses": dict(sorted(statuses.items())),
        "errors": errors,
        "tracebacks": tracebacks,
        "unhandled": len(tracebacks),
        "cancel_requests": sum(cancels),
        "schemathesis_exit": output.returncode,
        "summary": "\n".join((output.stdout + output.stderr).splitlines()[-60:]),
        "workdir": workdir,
    }


def _path(url: str) -> str:
    return httpx.URL(url).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=300, help="cases per operation and phase")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-time", type=int, default=0, help="seconds; 0: no limit")
    args = parser.parse_args()
    result = run(args)
    print(result["summary"])
    for (method, path, status), count in sorted(result["errors"].items()):
        print(f"server error: {method} {path} -> {status} ({count}x)")
    kinds = Counter((t.splitlines()[0].split(" (request")[0], t.strip().splitlines()[-1]) for t in result["tracebacks"])
    for (where, error), count in kinds.most_common():
        print(f"unhandled ({count}x): {re.sub(r'[0-9a-f-]{36}', '{id}', where)}: {error}")
    print(f"statuses: {result['statuses']}  (work files: {result['workdir']})")
    print(
        f"RESULT fuzz requests={result['requests']} server_errors={result['server_errors']} "
        f"unhandled={result['unhandled']} "
        f"seconds={result['seconds']:.0f} requests_per_second={result['requests'] / result['seconds']:.0f} "
        f"max_examples={args.max_examples} workers={args.workers} schemathesis_exit={result['schemathesis_exit']}"
    )


if __name__ == "__main__":
    main()
