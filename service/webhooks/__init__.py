"""Webhooks: `signing` (secrets, signatures, the event payload), `url_safety` (where deliveries may
go), `endpoints` (registered endpoints and their secrets) and `deliveries` (the outbox rows and the
REST API's side of them); workers/webhook_sender.py sends them.

Receivers verify a delivery with `from service.webhooks import verify, WebhookVerificationError`:
this package imports only the standard-library signing module, never the database."""

from service.webhooks.signing import WebhookVerificationError, verify

__all__ = ["WebhookVerificationError", "verify"]
