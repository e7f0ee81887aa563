"""Messages sent from inside a Celery task (a batch's validation sends one per line) are not
kept by that task: Celery's default (`add_to_parent=True`) appends each message's AsyncResult to
the running task's `request.children` until it ends, which made the validating process's memory grow ~2 KB a line."""

from __future__ import annotations

import uuid

from celery._state import _task_stack

from ponder.service.queue import enqueue_batch_jobs, enqueue_job
from ponder.workers.batch_tasks import validate_batch


def test_messages_sent_from_a_running_task_are_not_kept_by_it(settings):
    validate_batch.push_request(id="validating", called_directly=False, children=[])
    _task_stack.push(validate_batch)  # as the worker runs it: the current worker task
    try:
        enqueue_batch_jobs([uuid.uuid4() for _ in range(3)])
        enqueue_job(str(uuid.uuid4()), batch=True)
        assert validate_batch.request.children == []
    finally:
        _task_stack.pop()
        validate_batch.pop_request()
