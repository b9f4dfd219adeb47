"""Prometheus metrics: a sink fed by the agent's events and read from its state at scrape time.
May import: bus, wire, config, errors. Nothing on the command path imports it."""
