"""Prometheus metrics: a sink fed by the agent's events and read from its state at scrape time."""
