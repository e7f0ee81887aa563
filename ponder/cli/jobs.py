"""`ponder submit` and `ponder jobs`: a user's view of the service, through its REST API."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ponder.cli.console import cli_errors, console, out

jobs_app = typer.Typer(help="Jobs through the REST API: list, show, cancel.", no_args_is_help=True)


def submit(
    question: Annotated[str, typer.Argument(help="The user message")],
    wait: Annotated[bool, typer.Option("--wait", help="Stream the answer as it is written")] = False,
    max_tokens: Annotated[int | None, typer.Option(help="Completion tokens at most")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.6,
    seed: Annotated[int | None, typer.Option()] = None,
    math: Annotated[
        bool, typer.Option("--math", help="Append R1's maths directive (step by step, answer in \\boxed{})")
    ] = False,
    n: Annotated[int, typer.Option("--n", help="Samples of the question, voted on (self-consistency)")] = 1,
    early_stop: Annotated[
        bool, typer.Option("--early-stop", help="n > 1: stop the samples still running once the vote is decided")
    ] = False,
    min_agreement: Annotated[
        float | None, typer.Option(help="n > 1: stop the samples still running once one answer has this share")
    ] = None,
) -> None:
    """Submit a job (and with --wait, stream the reasoning and the answer live: sample 0's, then
    the vote when n > 1)."""
    from ponder.cli.client import ApiClient

    with cli_errors():
        client = ApiClient.from_env()
        body: dict = {"messages": [{"role": "user", "content": question}], "temperature": temperature, "math": math}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if seed is not None:
            body["seed"] = seed
        if n != 1:
            body["n"] = n
        if early_stop or min_agreement is not None:
            body["vote"] = {"early_stop": early_stop, "min_agreement": min_agreement}
        job = client.submit(body)
        if not wait:
            print(job["id"])
            return
        console.print(f"job {job['id']}", highlight=False)
        final = client.stream_live(job["id"], console)
        out.print(f"\n[dim]{final.get('status')} · {final.get('finish_reason')} · {final.get('usage')}[/dim]")
        if n > 1:
            print_vote(client.get_job(job["id"]))


def print_vote(job: dict) -> None:
    """The vote of an n-sample job: each group of equal answers, the winner first."""
    vote = job.get("vote")
    if not vote:
        out.print("[dim]no vote[/dim]")
        return
    table = Table(title=f"vote: {vote['answer']} ({vote['count']}/{vote['n']}, agreement {vote['agreement']:.2f})")
    for column in ("answer", "count", "samples"):
        table.add_column(column)
    for group in vote["groups"]:
        table.add_row(group["answer"], str(group["count"]), ", ".join(map(str, group["samples"])))
    if vote["unparsed"]:
        table.add_row("(no answer)", str(len(vote["unparsed"])), ", ".join(map(str, vote["unparsed"])))
    out.print(table)
    if job.get("stopped_early"):
        unspent = job.get("early_stop_unspent_tokens", 0)
        out.print(f"[dim]stopped early: the stopped samples had {unspent} tokens of budget left[/dim]")


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status")] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first)")] = 20,
) -> None:
    """List your jobs, newest first."""
    from ponder.cli.client import ApiClient

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

    from ponder.cli.client import ApiClient

    with cli_errors():
        out.print_json(json.dumps(ApiClient.from_env().get_job(job_id)))


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument()]) -> None:
    """Cancel a queued or running job."""
    from ponder.cli.client import ApiClient

    with cli_errors():
        job = ApiClient.from_env().cancel(job_id)
        out.print(f"{job['id']}: {job['status']}")
