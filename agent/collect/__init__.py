"""Collection: plans, scheduler, telemetry batches, last-known state, fault changes.
May import: config, wire, policy, store, bus, uds, core, metrics, errors. The system layer wires it to the
outbox and MQTT."""
