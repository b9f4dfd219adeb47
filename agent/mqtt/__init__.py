"""The fleet link (protocol v1): topics, messages, the durable store, intake, outbox and the paho client."""
