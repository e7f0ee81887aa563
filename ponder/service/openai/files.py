"""OpenAI's Files API: a file's row in `files` and its bytes at `Settings.files_dir / <id>`.

Uploads are streamed to disk as they arrive (ponder/api/uploads.py) and kept here (`store_upload`).
A key sees only its own files (another's is a 404). Ponder writes files of its own for batch
results (purpose `batch_output`, `write_file`)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, tuple_
from sqlmodel import Session, col, select

from ponder.service.errors import InvalidRequest, LimitExceeded, NotFound
from ponder.service.openai.batch_schemas import FileObject
from ponder.service.openai.common import unix_time
from ponder.service.security import one_at_a_time
from ponder.service.settings import Settings
from ponder.service.tables import FilePurpose, StoredFile

if TYPE_CHECKING:
    pass

UPLOAD_PURPOSES = (FilePurpose.batch,)  # what a client may upload; batch_output files are Ponder's


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def file_path(settings: Settings, file_id: str) -> Path:
    """Where a file's bytes are. Ids come from rows (or new_file_id), never from a request's path."""
    return settings.files_dir / file_id


def file_object(stored: StoredFile) -> FileObject:
    return FileObject(
        id=stored.id,
        bytes=stored.bytes,
        created_at=unix_time(stored.created_at),
        filename=stored.filename,
        purpose=FilePurpose(stored.purpose),
        status=stored.status,
    )


def get_file(session: Session, key_id: uuid.UUID, file_id: str) -> StoredFile:
    stored = session.get(StoredFile, file_id)
    if stored is None or stored.api_key_id != key_id:  # another key's file does not exist for this caller
        raise NotFound(f"no file {file_id}", "file_id")
    return stored


def list_files(
    session: Session, key_id: uuid.UUID, purpose: str | None, after: str | None, limit: int, newest_first: bool
) -> tuple[list[StoredFile], bool]:
    """A page of the key's files and whether more follow; `after`: the last id of the page before."""
    statement = select(StoredFile).where(StoredFile.api_key_id == key_id)
    if purpose is not None:
        statement = statement.where(StoredFile.purpose == purpose)
    position = tuple_(col(StoredFile.created_at), col(StoredFile.id))
    if after is not None:
        last = get_file(session, key_id, after)
        bound = tuple_(last.created_at, last.id)
        statement = statement.where(position < bound if newest_first else position > bound)
    if newest_first:
        statement = statement.order_by(col(StoredFile.created_at).desc(), col(StoredFile.id).desc())
    else:
        statement = statement.order_by(col(StoredFile.created_at), col(StoredFile.id))
    rows = list(session.exec(statement.limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


def delete_file(session: Session, key_id: uuid.UUID, file_id: str, settings: Settings) -> None:
    stored = get_file(session, key_id, file_id)
    session.delete(stored)
    session.commit()
    with contextlib.suppress(FileNotFoundError):  # the row was the file; the bytes go after it
        file_path(settings, stored.id).unlink()


def write_file(
    session: Session,
    key_id: uuid.UUID,
    file_id: str,
    filename: str,
    purpose: FilePurpose,
    lines: Iterable[bytes],
    settings: Settings,
) -> StoredFile:
    """A file Ponder makes, written line by line (its row added to the session, not committed).
    Written again under the same id, it replaces the first (a batch finalized twice)."""
    path = file_path(settings, file_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{file_id}.part")
    with partial.open("wb") as out:
        for line in lines:
            out.write(line)
        size = out.tell()
    os.replace(partial, path)
    stored = session.get(StoredFile, file_id)
    if stored is None:
        stored = StoredFile(id=file_id, api_key_id=key_id, purpose=purpose, filename=filename, bytes=size)
    stored.bytes = size
    session.add(stored)
    return stored


def check_storage(session: Session, key_id: uuid.UUID, incoming: int, settings: Settings) -> None:
    """A 429 `storage_quota_exceeded` when `incoming` more bytes would take the key's files past
    PONDER_FILE_STORAGE_PER_KEY_BYTES (deleting files makes room; waiting does not)."""
    stored = session.exec(select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(StoredFile.api_key_id == key_id))
    used = int(stored.one())
    quota = settings.file_storage_per_key_bytes
    if used + incoming > quota:
        message = f"this key's files hold {used} bytes; {incoming} more would pass its quota of {quota} bytes"
        raise LimitExceeded(message, code="storage_quota_exceeded", headers={"x-should-retry": "false"})


def store_upload(session: Session, key_id: uuid.UUID, upload: Upload, settings: Settings) -> StoredFile:
    """Keep a received upload within the key's storage quota: its bytes under its id first, then its
    row (a row never lacks them). A commit that fails leaves bytes no row names: beat sweeps them
    (ponder/workers/stray_files.py)."""
    one_at_a_time(session, key_id)  # concurrent uploads of a key each count the others' bytes
    check_storage(session, key_id, upload.bytes, settings)
    upload.keep(settings)
    stored = StoredFile(
        id=upload.file_id,
        api_key_id=key_id,
        purpose=upload.purpose(),
        filename=upload.filename or "upload",
        bytes=upload.bytes,
    )
    session.add(stored)
    session.commit()
    return stored


# -- uploads --------------------------------------------------------------------------------------


@dataclass
class Upload:
    """A received upload: its bytes in a `.part` file, until `keep` names it by its id."""

    file_id: str
    partial: Path
    filename: str | None = None
    bytes: int = 0
    fields: dict[str, str] = field(default_factory=dict)

    def keep(self, settings: Settings) -> None:
        os.replace(self.partial, file_path(settings, self.file_id))

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)

    def purpose(self) -> FilePurpose:
        """The purpose field, checked (and that a file came)."""
        purpose = self.fields.get("purpose")
        if self.filename is None:
            raise InvalidRequest("no file: send it as the multipart field `file`", "file")
        if purpose is None:
            raise InvalidRequest("purpose is required", "purpose")
        if purpose not in UPLOAD_PURPOSES:
            allowed = ", ".join(repr(str(p)) for p in UPLOAD_PURPOSES)
            raise InvalidRequest(f"purpose {purpose!r} is not supported (only {allowed})", "purpose")
        return FilePurpose(purpose)
