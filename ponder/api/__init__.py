"""The HTTP layer: the FastAPI app (`app.create_app`), its routers (`routes/`, one per resource),
dependencies (`deps`), middleware, the error handler that answers the service's domain errors with
their status codes, and how much one API process takes on at once (`capacity`). The rules it
serves live in ponder.service, which knows nothing of HTTP."""
