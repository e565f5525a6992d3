"""Webhook delivery: the worker that sends the outbox's routed events to agencies, signed and retried."""
