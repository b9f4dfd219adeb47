"""The agent's durable memory: the SQLite command ledger, the outbox of messages to publish, the audit log.
May import: the standard library only (it stores bytes and JSON, it knows no protocol)."""
