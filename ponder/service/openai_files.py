"""OpenAI's Files API: a file's row in `files` and its bytes at `Settings.files_dir / <id>`.

Uploads are streamed: the multipart body is parsed as it arrives and the file part written to disk
chunk by chunk (a `.part` file, renamed once whole), so an upload of PONDER_MAX_FILE_BYTES costs no
memory; one byte more is a 413. A key sees only its own files (another's is a 404). Ponder writes
files of its own for batch results (purpose `batch_output`, `write_file`)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import tuple_
from sqlmodel import Session, col, select
from starlette.requests import Request

from ponder.service.errors import ApiError
from ponder.service.models import FilePurpose, StoredFile
from ponder.service.openai_batch_schemas import FileObject
from ponder.service.openai_compat import unix_time
from ponder.service.settings import Settings

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

UPLOAD_PURPOSES = (FilePurpose.batch,)  # what a client may upload; batch_output files are Ponder's
_MAX_FIELD_BYTES = 1024  # a text field of the form (purpose)
_FORM_FIELDS = {"file", "purpose"}
# The multipart framing around the file (boundaries, part headers, the purpose field): what the
# request-size limit allows for /v1/files beyond PONDER_MAX_FILE_BYTES (ponder/service/app.py).
MULTIPART_SLACK = 64 * 1024


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
        raise ApiError(404, f"no file {file_id}", "file_id")
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


def store_upload(session: Session, key_id: uuid.UUID, upload: Upload, settings: Settings) -> StoredFile:
    """Keep a received upload: its bytes under its id first, then its row (a row never lacks them)."""
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
            raise ApiError(400, "no file: send it as the multipart field `file`", "file")
        if purpose is None:
            raise ApiError(400, "purpose is required", "purpose")
        if purpose not in UPLOAD_PURPOSES:
            allowed = ", ".join(repr(str(p)) for p in UPLOAD_PURPOSES)
            raise ApiError(400, f"purpose {purpose!r} is not supported (only {allowed})", "purpose")
        return FilePurpose(purpose)


async def receive_upload(request: Request, settings: Settings) -> Upload:
    """The multipart form of POST /v1/files, its `file` part written to disk as it arrives."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise ApiError(400, "send the file as multipart/form-data (fields `file` and `purpose`)")
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    file_id = new_file_id()
    upload = Upload(file_id, settings.files_dir / f".{file_id}.part")
    try:
        with upload.partial.open("wb") as out:
            form = _FormReader(upload, settings.max_file_bytes)
            parser = MultipartParser(options[b"boundary"], form.callbacks())
            async for chunk in request.stream():
                parser.write(chunk)
                if form.pending:  # file writes off the event loop
                    await anyio.to_thread.run_sync(out.writelines, form.take())
            parser.finalize()
        upload.purpose()  # the fields are checked before anything is kept
    except FormParserError as e:
        upload.discard()
        raise ApiError(400, f"the multipart body is malformed: {e}") from e
    except BaseException:
        upload.discard()
        raise
    return upload


class _FormReader:
    """python-multipart's callbacks for the upload form: the file part's data is queued for the
    disk (`take`), text fields are kept (1 KB each at most)."""

    def __init__(self, upload: Upload, max_file_bytes: int) -> None:
        self.upload, self.max_file_bytes = upload, max_file_bytes
        self.pending: list[bytes] = []
        self._header_name = self._header_value = self._disposition = b""
        self._name: str | None = None
        self._is_file = False
        self._text = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._add_header(name=data[start:end]),
            "on_header_value": lambda data, start, end: self._add_header(value=data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def take(self) -> list[bytes]:
        taken, self.pending = self.pending, []
        return taken

    def _part_begin(self) -> None:
        self._disposition, self._name, self._is_file, self._text = b"", None, False, bytearray()

    def _add_header(self, name: bytes = b"", value: bytes = b"") -> None:
        self._header_name += name
        self._header_value += value

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name not in _FORM_FIELDS:
            raise ApiError(400, f"unknown field {self._name!r}", self._name or None)
        self._is_file = self._name == "file"
        if self._is_file:
            if self.upload.filename is not None:
                raise ApiError(400, "one file per upload", "file")
            self.upload.filename = options.get(b"filename", b"upload").decode("utf-8", "replace")[:255]

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file:
            self._text += data[start:end]
            if len(self._text) > _MAX_FIELD_BYTES:
                raise ApiError(400, f"the field {self._name!r} is too long", self._name)
            return
        self.upload.bytes += end - start
        if self.upload.bytes > self.max_file_bytes:
            raise ApiError(413, f"the file is larger than {self.max_file_bytes} bytes (PONDER_MAX_FILE_BYTES)", "file")
        self.pending.append(data[start:end])

    def _part_end(self) -> None:
        if not self._is_file and self._name is not None:
            self.upload.fields[self._name] = self._text.decode("utf-8", "replace")
