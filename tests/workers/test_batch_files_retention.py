"""Retention of /v1/files (ponder/workers/batches.py:purge_old_files) on real databases: files older than
PONDER_RETENTION_DAYS go, row and bytes, except the input of a batch still running; once."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlmodel import Session, select

from ponder.service.db import sql_engine
from ponder.service.openai.files import file_path
from ponder.service.tables import ApiKey, Batch, BatchStatus, FilePurpose, StoredFile, utcnow
from ponder.workers.batches import purge_old_files


def test_old_files_go_but_a_running_batchs_input_stays(settings):
    settings = settings.model_copy(update={"retention_days": 30})
    old, new = utcnow() - timedelta(days=31), utcnow() - timedelta(days=29)
    with Session(sql_engine(settings, background=True)) as session:
        key = ApiKey(name="r", prefix=uuid.uuid4().hex[:8], key_hash=uuid.uuid4().hex * 2)
        session.add(key)
        session.flush()
        ages = {"old-upload": old, "old-output": old, "running-input": old, "done-input": old, "new-upload": new}
        for name, created_at in ages.items():
            file_id = f"file-{name}"
            path = file_path(settings, file_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b'{"secret": "prompt"}\n')
            purpose = FilePurpose.batch_output if "output" in name else FilePurpose.batch
            session.add(
                StoredFile(
                    id=file_id, api_key_id=key.id, purpose=purpose, filename=name, bytes=21, created_at=created_at
                )
            )
        for status, input_file in ((BatchStatus.in_progress, "running-input"), (BatchStatus.completed, "done-input")):
            session.add(
                Batch(
                    id=f"batch_{uuid.uuid4().hex}",
                    api_key_id=key.id,
                    endpoint="/v1/chat/completions",
                    input_file_id=f"file-{input_file}",
                    completion_window="24h",
                    status=status,
                    expires_at=utcnow() + timedelta(hours=1),
                )
            )
        session.commit()

    assert purge_old_files(settings.model_copy(update={"retention_days": 0})) == {"files_deleted": 0}
    assert purge_old_files(settings) == {"files_deleted": 3}
    kept = {"file-running-input", "file-new-upload"}
    with Session(sql_engine(settings, background=True)) as session:
        assert set(session.exec(select(StoredFile.id)).all()) == kept
    assert {p.name for p in settings.files_dir.iterdir()} == kept
    assert purge_old_files(settings) == {"files_deleted": 0}  # idempotent
