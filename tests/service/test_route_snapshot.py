"""Every route answers as recorded in tests/data/route_snapshot.json (tests/route_snapshot.py): the
same statuses, headers and bodies (volatile values normalized) and the same OpenAPI schema, on the
real app with no worker. The snapshot was first recorded before the layout pass of issue 23
(commit 3a926a1), which left every answer as it was; a route added since, or an answer changed on
purpose (since: the descriptions of DELETE /v1/jobs/{id}, /readyz, POST /v1/files and
/v1/batches, the message of the jobs-at-once limit, redeliveries counted against requests per
minute, a job's `worker` no longer shown), is re-recorded with `python -m tests.route_snapshot record`.

The check runs in a process of its own: the app's module-level state (the metrics' caches and
registry, the Celery client, the served model's tokenizer, the settings) must start as a fresh API
process's does, whatever other tests of this process did before."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.stack import ROOT

# Next to the process's stack database, as the other tests that build the app take it
# (test_operator_routes.py, test_fuzz_api.py): a test process runs one module at a time, and each
# flushes it first. Its four (- 1 .. + 2) are all taken, and a fifth would be another process's.
REDIS_DB = int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1


def test_every_route_answers_as_recorded(tmp_path):
    command = [sys.executable, "-m", "tests.route_snapshot", "check", "--workdir", str(tmp_path)]
    result = subprocess.run(
        [*command, "--redis-db", str(REDIS_DB)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}"
