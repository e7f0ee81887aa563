"""Webhooks: `signing` (secrets, signatures, the event payload), `url_safety` (where deliveries may
go), `endpoints` (registered endpoints and their secrets) and `deliveries` (the outbox rows and the
REST API's side of them); ponder/workers/webhook_sender.py sends them.

Receivers verify a delivery with `from ponder.service.webhooks import verify, WebhookVerificationError`:
this package imports only the standard-library signing module, never the database."""

from ponder.service.webhooks.signing import WebhookVerificationError, verify

__all__ = ["WebhookVerificationError", "verify"]
