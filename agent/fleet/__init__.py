"""The fleet link over MQTT: intake of commands (decode, record, acknowledge, admit), the outbox pump,
the paho connection, flow control, and the backend-side caller. May import: wire, policy, store, config,
clock, errors."""
