"""DELETE /v1/jobs/{id} through the real stack: a running job is refused (409: cancel first), a
finished one is erased (its prompt, output and live stream gone; its usage kept), an unknown one
is 404."""

from __future__ import annotations

import uuid

from ponder.service.streams import stream_key
from tests.e2e.test_jobs import submit, wait_running_with_output
from tests.stack import wait_final


def test_delete_erases_a_finished_job_and_keeps_its_usage(stack):
    with stack.client() as client:
        body = {"messages": [{"role": "user", "content": "A secret to forget."}], "max_tokens": 600, "seed": 1}
        job = submit(client, body)
        wait_running_with_output(client, job["id"])
        refused = client.delete(f"/v1/jobs/{job['id']}")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_not_finished"

        client.post(f"/v1/jobs/{job['id']}/cancel")
        finished = wait_final(client, job["id"])
        assert finished["reasoning_content"] or finished["content"]  # there is output to erase
        assert stack.redis.exists(stream_key(job["id"]))

        deleted = client.delete(f"/v1/jobs/{job['id']}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"id": job["id"], "object": "job.deleted", "deleted": True}
        after = client.get(f"/v1/jobs/{job['id']}").json()
        assert (after["content"], after["reasoning_content"], after["answer"]) == (None, None, None)
        assert after["status"] == finished["status"] and after["usage"] == finished["usage"]
        assert not stack.redis.exists(stream_key(job["id"]))
        with client.stream("GET", f"/v1/jobs/{job['id']}/stream") as stream:
            events = "".join(stream.iter_text())
        assert "event: done" in events and "event: reasoning" not in events and "event: content" not in events

        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200  # again: nothing left to erase
        missing = client.delete(f"/v1/jobs/{uuid.uuid4()}")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "job_id"
