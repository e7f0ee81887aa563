"""A small client of the REST API for the `ponder submit` and `ponder jobs` commands (ponder/cli/jobs.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

from ponder.cli.devstack import dev_key_file
from ponder.service.settings import get_settings


class ApiClientError(Exception):
    pass


class ApiClient:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)

    @classmethod
    def from_env(cls) -> ApiClient:
        """PONDER_API_URL and PONDER_API_KEY, else the dev stack's URL and key file (`ponder up`)."""
        base_url = os.environ.get("PONDER_API_URL") or get_settings().base_url
        key = os.environ.get("PONDER_API_KEY") or _read(dev_key_file())
        if not key:
            raise ApiClientError(f"no API key: set PONDER_API_KEY (or run `ponder up`, which writes {dev_key_file()})")
        return cls(base_url, key)

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/jobs", json=body)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        params = {"limit": limit} | ({"status": status} if status else {})
        return self._call("GET", "/v1/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str):
        """(event, data) pairs of the job's server-sent events, until `done`."""
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/stream", timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiClientError(_message(response))
                event = None
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event:
                        yield event, json.loads(line[6:])
                        if event == "done":
                            return
        except httpx.HTTPError as e:
            raise ApiClientError(f"cannot reach the API: {e}") from e

    def stream_live(self, job_id: str, console) -> dict[str, Any]:
        """Print reasoning (dimmed) and content as they arrive (sample 0's, for a job with n > 1);
        returns the final event."""
        thinking = False
        for event, data in self.events(job_id):
            if event in ("reasoning", "content") and data.get("index", 0) != 0:
                continue
            if event == "reasoning":
                if not thinking:
                    console.print("[dim]thinking…[/dim]")
                    thinking = True
                console.print(data["delta"], end="", style="dim", highlight=False, markup=False)
            elif event == "content":
                if thinking:
                    console.print()
                    thinking = False
                console.print(data["delta"], end="", highlight=False, markup=False)
            elif event == "reset":
                console.print("\n[yellow](the job restarted)[/yellow]")
            elif event == "done":
                return data
        return {}

    def _call(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ApiClientError(f"cannot reach the API at {self.http.base_url}: {e}") from e
        if response.status_code >= 400:
            raise ApiClientError(_message(response))
        return response.json()


def _message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{response.status_code}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:200]}"


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None
