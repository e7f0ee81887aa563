"""`ponder`: the command line. Long work shows progress; errors are one clear line, never a traceback.

The commands live by concern (models, processes, admin, jobs); here they are registered, in the order
`ponder --help` lists them."""

from __future__ import annotations

import typer

from ponder.cli import processes
from ponder.cli.admin import db_app, keys_app, secrets_app
from ponder.cli.jobs import jobs_app, submit
from ponder.cli.model_cache import models_app

app = typer.Typer(help="Ponder: async jobs for long LLM reasoning.", no_args_is_help=True)
app.command("api")(processes.api)
app.command("worker")(processes.worker)
app.command("webhooks-worker")(processes.webhooks_worker)
app.command("batches-worker")(processes.batches_worker)
app.command("beat")(processes.beat)
app.command("flower")(processes.flower)
app.command("up")(processes.up)
app.command("submit")(submit)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.add_typer(secrets_app, name="secrets")
app.add_typer(jobs_app, name="jobs")


def main() -> None:
    app(prog_name="ponder")
