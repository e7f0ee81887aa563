"""Ponder: an async job service for long LLM reasoning jobs, with its own inference engine.

Every part is a subpackage (docs/architecture.md, "The map"): `ponder.engine` (the inference
engine), `ponder.kernels` (its kernels), `ponder.service` (the API and the database),
`ponder.workers` (Celery's processes) and `ponder.cli` (the `ponder` command). One import name for
the whole project, so that none of its parts shadows another distribution's package (`kernels`,
`service` and `workers` are all names on the package index). Importing `ponder` imports nothing else.
"""
