"""Uploads without the stack: the multipart body is parsed as it streams and the file written to
disk (nothing is left behind when it is refused); 413 past PONDER_MAX_FILE_BYTES, whichever limit
sees it first (the upload's own, or the request-size limit, which allows uploads more)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from ponder.api.errors import install_error_handlers
from ponder.api.middleware import BodyLimits
from ponder.api.uploads import MULTIPART_SLACK, receive_upload
from ponder.service.settings import Settings


@pytest.fixture
def settings(tmp_path):
    return Settings(files_dir=tmp_path / "files", max_file_bytes=10_000, _env_file=None)


@pytest.fixture
def client(settings):
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/files")
    async def upload(request: Request) -> dict:
        received = await receive_upload(request, settings)
        received.keep(settings)
        return {"id": received.file_id, "bytes": received.bytes, "filename": received.filename, **received.fields}

    limited = BodyLimits(app, max_bytes=1024, streamed_paths={"/v1/files": settings.max_file_bytes + MULTIPART_SLACK})
    return TestClient(limited)


def test_an_upload_is_written_to_disk_under_its_id(client, settings):
    data = b"".join(b'{"line": %d}\n' % i for i in range(500))  # above the 1 KB limit of other paths
    response = client.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("file-") and (body["bytes"], body["filename"], body["purpose"]) == (
        len(data),
        "in.jsonl",
        "batch",
    )
    assert (settings.files_dir / body["id"]).read_bytes() == data
    assert [p.name for p in settings.files_dir.iterdir()] == [body["id"]]  # no .part left


@pytest.mark.parametrize(
    ("files", "data", "param"),
    [
        ({"file": ("in.jsonl", b"{}\n")}, {"purpose": "fine-tune"}, "purpose"),
        ({"file": ("in.jsonl", b"{}\n")}, {}, "purpose"),
        ({"purpose": (None, "batch")}, {}, "file"),  # multipart with no file part
        ({"file": ("in.jsonl", b"{}\n")}, {"purpose": "batch", "expires_after": "1"}, "expires_after"),
    ],
)
def test_refused_uploads_leave_nothing(client, settings, files, data, param):
    response = client.post("/v1/files", files=files, data=data)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert list(settings.files_dir.iterdir()) == []


def test_not_multipart_is_a_400(client):
    response = client.post("/v1/files", json={"purpose": "batch"})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]


def test_a_file_over_the_limit_is_a_413_and_is_not_kept(client, settings):
    response = client.post("/v1/files", files={"file": ("in.jsonl", b"x" * 10_001)}, data={"purpose": "batch"})
    assert response.status_code == 413 and "PONDER_MAX_FILE_BYTES" in response.json()["error"]["message"]
    assert list(settings.files_dir.iterdir()) == []
    exact = client.post("/v1/files", files={"file": ("in.jsonl", b"x" * 10_000)}, data={"purpose": "batch"})
    assert exact.status_code == 200 and exact.json()["bytes"] == 10_000
    # far beyond it, the request-size limit answers before anything is read
    huge = client.post("/v1/files", files={"file": ("in.jsonl", b"x" * (10_000 + MULTIPART_SLACK))})
    assert huge.status_code == 413 and "request body" in huge.json()["error"]["message"]


def multipart(part_headers: list[bytes], boundary: bytes = b"b0undary") -> tuple[bytes, dict[str, str]]:
    """A form whose file part carries `part_headers` before its own, and a purpose field."""
    body = b"".join(
        [
            b"--" + boundary + b"\r\n",
            *(header + b"\r\n" for header in part_headers),
            b'Content-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n{}\n\r\n',
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n',
            b"--" + boundary + b"--\r\n",
        ]
    )
    return body, {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}


@pytest.mark.parametrize(
    "part_headers",
    [[b"X-Pad: " + b"a" * 60_000], [b"X-Pad-%d: a" % i for i in range(2_000)]],
    ids=["a 60 KB header line", "2,000 header lines"],
)
def test_part_headers_are_bounded(client, settings, part_headers):
    """A part's headers are held in memory while parsed: python-multipart (>= 0.0.27) caps their size
    and count, and the form is refused as malformed; older releases read them all."""
    body, headers = multipart(part_headers)
    assert len(body) < settings.max_file_bytes + MULTIPART_SLACK  # within the request-size limit
    response = client.post("/v1/files", content=body, headers=headers)
    assert response.status_code == 400 and "malformed" in response.json()["error"]["message"], response.text
    assert list(settings.files_dir.iterdir()) == []
    ordinary, headers = multipart([b"Content-Type: application/jsonl"])
    assert client.post("/v1/files", content=ordinary, headers=headers).status_code == 200
