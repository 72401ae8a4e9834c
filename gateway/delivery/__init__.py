"""Delivery: routes, the durable outbox, the HTTPS transport and one adapter per destination."""
