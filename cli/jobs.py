"""`ponder submit` and `ponder jobs`: a user's view of the service, through its REST API."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.console import cli_errors, console, out

jobs_app = typer.Typer(help="Jobs through the REST API: list, show, cancel.", no_args_is_help=True)


def submit(
    question: Annotated[str, typer.Argument(help="The user message")],
    wait: Annotated[bool, typer.Option("--wait", help="Stream the answer as it is written")] = False,
    max_tokens: Annotated[int | None, typer.Option(help="Completion tokens at most")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.6,
    seed: Annotated[int | None, typer.Option()] = None,
    math: Annotated[bool, typer.Option("--math", help="Append R1's maths directive")] = False,
) -> None:
    """Submit a job (and with --wait, stream the reasoning and the answer live)."""
    from cli.client import ApiClient

    with cli_errors():
        client = ApiClient.from_env()
        body = {"messages": [{"role": "user", "content": question}], "temperature": temperature, "math": math}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if seed is not None:
            body["seed"] = seed
        job = client.submit(body)
        if not wait:
            print(job["id"])
            return
        console.print(f"job {job['id']}", highlight=False)
        final = client.stream_live(job["id"], console)
        out.print(f"\n[dim]{final.get('status')} · {final.get('finish_reason')} · {final.get('usage')}[/dim]")


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status")] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first)")] = 20,
) -> None:
    """List your jobs, newest first."""
    from cli.client import ApiClient

    with cli_errors():
        page = ApiClient.from_env().list_jobs(status=status, limit=limit)
        table = Table()
        for column in ("id", "status", "created", "tokens", "answer"):
            table.add_column(column)
        for job in page["data"]:
            table.add_row(
                job["id"],
                job["status"],
                job["timings"]["created_at"],
                str(job["usage"]["total_tokens"]),
                job.get("answer") or "",
            )
        out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument()]) -> None:
    """Show one job as JSON."""
    import json

    from cli.client import ApiClient

    with cli_errors():
        out.print_json(json.dumps(ApiClient.from_env().get_job(job_id)))


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument()]) -> None:
    """Cancel a queued or running job."""
    from cli.client import ApiClient

    with cli_errors():
        job = ApiClient.from_env().cancel(job_id)
        out.print(f"{job['id']}: {job['status']}")
