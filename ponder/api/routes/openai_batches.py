"""/v1/batches (OpenAI's shape): a file of requests run as ordinary jobs, behind direct ones."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ponder.api.deps import CurrentKey, RateLimited, SessionDep, SettingsDep
from ponder.api.errors import BadRequestRoute
from ponder.service.openai import batches
from ponder.service.openai.batch_schemas import BatchCreate, BatchList, BatchObject

router = APIRouter(prefix="/v1/batches", tags=["openai"], route_class=BadRequestRoute)


@router.post("", response_model=BatchObject)
def create_batch(
    body: BatchCreate, key: CurrentKey, session: SessionDep, settings: SettingsDep, charge: RateLimited
) -> BatchObject:
    """Run each line of an uploaded file (purpose `batch`) as a job; `validating` at first. The
    request counts against the key's requests per minute; its lines against the key's tokens per day
    (a line beyond it fails alone, 429), not its tokens per minute or jobs at once (a batch runs
    behind direct jobs, as OpenAI's own batch queue does)."""
    return batches.batch_objects(session, [batches.create_batch(session, key.id, body, settings)])[0]


@router.get("", response_model=BatchList)
def list_batches(
    key: CurrentKey,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    """Your batches, newest first, a page at a time (`after`: the last id seen)."""
    page, has_more = batches.list_batches(session, key.id, after, limit)
    data = batches.batch_objects(session, page)
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/{batch_id}", response_model=BatchObject)
def retrieve_batch(batch_id: str, key: CurrentKey, session: SessionDep) -> BatchObject:
    """The batch, with its request counts as of now."""
    return batches.batch_objects(session, [batches.get_batch(session, key.id, batch_id)])[0]


@router.post("/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(batch_id: str, key: CurrentKey, session: SessionDep) -> BatchObject:
    """cancelling now, then cancelled once its running lines have stopped (partial results kept)."""
    return batches.batch_objects(session, [batches.cancel_batch(session, key.id, batch_id)])[0]
