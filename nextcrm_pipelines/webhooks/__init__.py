"""Webhooks: the receiver ASGI app and what each provider's signature and events look like."""
