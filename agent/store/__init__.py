"""The agent's durable memory: the SQLite command ledger and the outbox of messages to publish.
May import: the standard library only (it stores bytes and JSON, it knows no protocol)."""
