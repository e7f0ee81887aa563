"""/v1/usage: the caller's token totals by day and model."""

from __future__ import annotations

from fastapi import APIRouter

from ponder.api.deps import CurrentKey, SessionDep
from ponder.service import job_rules
from ponder.service.job_public import UsageReport

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", response_model=UsageReport)
def usage(key: CurrentKey, session: SessionDep) -> UsageReport:
    """Tokens of the caller's finished jobs, per day (UTC) and model."""
    return UsageReport(data=job_rules.usage_report(session, key))
