"""Per-key limits on files and batches, on the real app (create_app, its lifespan, SQLite, a real
Redis): uploads stop at the key's storage quota (nothing of a refused one is kept) and batches at
its unfinished-batches limit; another key is not held to the first one's use. Neither had a limit:
one key could fill the disk, and run any number of 50,000-line batches off one file."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from ponder.api.app import create_app
from ponder.service.db import database_engine, upgrade
from ponder.service.security import create_api_key
from ponder.service.settings import Settings
from tests.stack import start_redis

REDIS_DB = int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1
LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}}\n'  # noqa: E501


@pytest.fixture
def app(tmp_path):
    redis_url, process = start_redis(tmp_path, db=REDIS_DB)
    url = f"sqlite:///{tmp_path / 'ponder.db'}"
    upgrade(url)
    settings = Settings(
        _env_file=None,
        database_url=url,
        redis_url=redis_url,
        data_dir=tmp_path,
        model="tiny-llama",
        file_storage_per_key_bytes=3 * len(LINE),
        max_batches_per_key=2,
    )
    with TestClient(create_app(settings)) as client:
        yield client, settings
    database_engine.cache_clear()
    if process is not None:
        process.kill()


def key(settings: Settings) -> dict[str, str]:
    with Session(database_engine(settings.database_url)) as session:
        _, secret = create_api_key(session, "quota")
    return {"Authorization": f"Bearer {secret}"}


def upload(client: TestClient, headers: dict[str, str], lines: int = 1):
    return client.post(
        "/v1/files", headers=headers, files={"file": ("in.jsonl", LINE * lines)}, data={"purpose": "batch"}
    )


def test_uploads_stop_at_the_keys_storage_quota(app):
    client, settings = app
    first, second = key(settings), key(settings)
    assert upload(client, first, 2).status_code == 200
    refused = upload(client, first, 2)  # 4 lines' worth: one more than the quota
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "storage_quota_exceeded" and refused.headers["x-should-retry"] == "false"
    assert len(list(settings.files_dir.iterdir())) == 1  # nothing of the refused upload is kept
    assert upload(client, first, 1).status_code == 200  # exactly the quota
    assert upload(client, second, 3).status_code == 200  # another key's quota is its own
    deleted = client.get("/v1/files", headers=first).json()["data"][0]["id"]
    assert client.delete(f"/v1/files/{deleted}", headers=first).status_code == 200
    assert upload(client, first, 1).status_code == 200  # deleting made room


def test_batches_stop_at_the_keys_unfinished_limit(app):
    client, settings = app
    first, second = key(settings), key(settings)
    file_id = upload(client, first).json()["id"]
    batch = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert [client.post("/v1/batches", headers=first, json=batch).status_code for _ in range(2)] == [200, 200]
    refused = client.post("/v1/batches", headers=first, json=batch)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_batches", refused.text
    other = {**batch, "input_file_id": upload(client, second).json()["id"]}
    assert client.post("/v1/batches", headers=second, json=other).status_code == 200
