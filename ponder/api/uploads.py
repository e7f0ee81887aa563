"""POST /v1/files' body: the multipart form parsed as it arrives, the file part written to disk chunk
by chunk (a `.part` file, renamed once whole: ponder/service/openai/files.py Upload), so an upload
of PONDER_MAX_FILE_BYTES costs no memory; one byte more is a 413."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from ponder.service.errors import InvalidRequest, TooLarge
from ponder.service.openai.files import Upload, new_file_id
from ponder.service.settings import Settings

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

_MAX_FIELD_BYTES = 1024  # a text field of the form (purpose)


_FORM_FIELDS = {"file", "purpose"}


# The multipart framing around the file (boundaries, part headers, the purpose field): what the
# request-size limit allows for /v1/files beyond PONDER_MAX_FILE_BYTES (ponder/api/app.py).
MULTIPART_SLACK = 64 * 1024


async def receive_upload(request: Request, settings: Settings) -> Upload:
    """The multipart form of POST /v1/files, its `file` part written to disk as it arrives."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise InvalidRequest("send the file as multipart/form-data (fields `file` and `purpose`)")
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
        raise InvalidRequest(f"the multipart body is malformed: {e}") from e
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
            raise InvalidRequest(f"unknown field {self._name!r}", self._name or None)
        self._is_file = self._name == "file"
        if self._is_file:
            if self.upload.filename is not None:
                raise InvalidRequest("one file per upload", "file")
            self.upload.filename = options.get(b"filename", b"upload").decode("utf-8", "replace")[:255]

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file:
            self._text += data[start:end]
            if len(self._text) > _MAX_FIELD_BYTES:
                raise InvalidRequest(f"the field {self._name!r} is too long", self._name)
            return
        self.upload.bytes += end - start
        if self.upload.bytes > self.max_file_bytes:
            raise TooLarge(f"the file is larger than {self.max_file_bytes} bytes (PONDER_MAX_FILE_BYTES)", "file")
        self.pending.append(data[start:end])

    def _part_end(self) -> None:
        if not self._is_file and self._name is not None:
            self.upload.fields[self._name] = self._text.decode("utf-8", "replace")
