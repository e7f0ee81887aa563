"""Beat's sweep of PONDER_FILES_DIR (ponder/workers/stray_files.py) on real databases: `.part` files an
API process that died mid-upload left, and bytes whose row never committed, go once untouched for
an hour; files with rows, and anything younger, stay."""

from __future__ import annotations

import os
import time
import uuid

from sqlmodel import Session

from ponder.service.db import database_engine
from ponder.service.tables import ApiKey, FilePurpose, StoredFile
from ponder.workers.stray_files import STRAY_AFTER_SECONDS, sweep_stray_files


def touch(path, age_seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'{"prompt": "secret"}\n')
    then = time.time() - age_seconds
    os.utime(path, (then, then))


def test_stray_files_go_and_the_rest_stay(settings):
    old, young = STRAY_AFTER_SECONDS + 60, STRAY_AFTER_SECONDS - 60
    files = settings.files_dir
    with Session(database_engine(settings.database_url)) as session:
        key = ApiKey(name="f", prefix=uuid.uuid4().hex[:8], key_hash=uuid.uuid4().hex * 2)
        session.add(key)
        session.flush()
        session.add(StoredFile(id="file-kept", api_key_id=key.id, purpose=FilePurpose.batch, filename="k", bytes=21))
        session.commit()
    touch(files / "file-kept", old)  # its row committed
    touch(files / ".file-dead-upload.part", old)  # the API died mid-upload
    touch(files / "file-no-row", old)  # moved under its id, then the commit failed
    touch(files / ".file-uploading.part", young)  # still arriving
    touch(files / "file-committing", young)  # its commit is a moment away
    assert sweep_stray_files(settings) == {"stray_files_deleted": 2}
    assert sorted(p.name for p in files.iterdir()) == [".file-uploading.part", "file-committing", "file-kept"]
    assert sweep_stray_files(settings) == {"stray_files_deleted": 0}  # idempotent
    later = time.time() + 120  # two minutes on: the young ones are stray too, the kept file is not
    assert sweep_stray_files(settings, now=later) == {"stray_files_deleted": 2}
    assert [p.name for p in files.iterdir()] == ["file-kept"]
