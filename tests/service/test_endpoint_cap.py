"""The cap of PONDER's webhook endpoints per key (ponder/service/webhooks/endpoints.py) holds under
concurrent creation, on SQLite and PostgreSQL: the count and the insert were two steps, so
concurrent requests could all see room and all insert."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlmodel import Session, col, func, select

from ponder.service import db
from ponder.service.errors import Conflict
from ponder.service.security import create_api_key
from ponder.service.settings import Settings
from ponder.service.tables import WebhookEndpoint
from ponder.service.webhooks.endpoints import MAX_ENDPOINTS_PER_KEY, create_endpoint
from ponder.service.webhooks.schemas import WebhookEndpointCreate
from tests.stack import database


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_creations_never_pass_the_cap(kind, tmp_path):
    with database(kind, tmp_path) as url:
        db.upgrade(url)
        engine = db.database_engine(url, pool=db.Pool(size=32, overflow=0))
        settings = Settings(_env_file=None, database_url=url, webhook_allow_private=True)
        with Session(engine) as session:
            key, _ = create_api_key(session, "hooks")
            session.expunge(key)
        start = threading.Barrier(3 * MAX_ENDPOINTS_PER_KEY // 2)

        def create(i: int) -> str:
            body = WebhookEndpointCreate(url=f"http://127.0.0.1:9/hook/{i}")
            with Session(engine) as session:
                start.wait()
                try:
                    create_endpoint(session, key, body, settings)
                    return "created"
                except Conflict:
                    return "refused"

        with ThreadPoolExecutor(start.parties) as pool:
            outcomes = list(pool.map(create, range(start.parties)))
        with Session(engine) as session:
            count = session.exec(select(func.count()).where(col(WebhookEndpoint.api_key_id) == key.id)).one()
        assert (outcomes.count("created"), outcomes.count("refused"), count) == (
            MAX_ENDPOINTS_PER_KEY,
            start.parties - MAX_ENDPOINTS_PER_KEY,
            MAX_ENDPOINTS_PER_KEY,
        )
        engine.dispose()
