"""/v1/files (OpenAI's shape): upload a batch's input, list, look up, download, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from ponder.api.capacity import release_session
from ponder.api.deps import CurrentKey, SessionDep, SettingsDep
from ponder.api.errors import BadRequestRoute
from ponder.api.uploads import MULTIPART_SLACK, receive_upload
from ponder.service.errors import NotFound
from ponder.service.openai import files
from ponder.service.openai.batch_schemas import FileDeleted, FileList, FileObject
from ponder.service.tables import FilePurpose
from ponder.service.threads import run_in_threadpool

router = APIRouter(prefix="/v1/files", tags=["openai"], route_class=BadRequestRoute)

_UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": [str(p) for p in files.UPLOAD_PURPOSES]},
                    },
                }
            }
        },
    }
}


@router.post("", response_model=FileObject, openapi_extra=_UPLOAD_FORM)
async def upload_file(request: Request, key: CurrentKey, session: SessionDep, settings: SettingsDep) -> FileObject:
    """Upload a file (multipart `file` and `purpose` `batch`), streamed to disk; 413 beyond
    PONDER_MAX_FILE_BYTES, 429 beyond the key's storage quota."""
    announced = int(request.headers.get("content-length") or 0)  # the file and its framing: a bound
    await run_in_threadpool(files.check_storage, session, key.id, max(announced - MULTIPART_SLACK, 0), settings)
    await release_session(session)  # the upload may take long: no connection held meanwhile
    upload = await receive_upload(request, settings)
    try:
        stored = await run_in_threadpool(files.store_upload, session, key.id, upload, settings)
    except BaseException:
        upload.discard()
        raise
    return files.file_object(stored)


@router.get("", response_model=FileList)
def list_files(
    key: CurrentKey,
    session: SessionDep,
    purpose: FilePurpose | None = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """Your files, newest first (`order=asc`: oldest), a page at a time (`after`: the last id seen)."""
    rows, has_more = files.list_files(session, key.id, purpose, after, limit, newest_first=order == "desc")
    data = [files.file_object(row) for row in rows]
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, key: CurrentKey, session: SessionDep) -> FileObject:
    return files.file_object(files.get_file(session, key.id, file_id))


@router.get("/{file_id}/content", response_class=FileResponse)
def file_content(file_id: str, key: CurrentKey, session: SessionDep, settings: SettingsDep) -> FileResponse:
    """The file's bytes (a batch's output and error files are JSONL)."""
    stored = files.get_file(session, key.id, file_id)
    path = files.file_path(settings, stored.id)
    if not path.is_file():
        raise NotFound(f"the bytes of file {stored.id} are gone", "file_id")
    return FileResponse(path, media_type="application/octet-stream", filename=stored.filename)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, key: CurrentKey, session: SessionDep, settings: SettingsDep) -> FileDeleted:
    files.delete_file(session, key.id, file_id, settings)
    return FileDeleted(id=file_id)
