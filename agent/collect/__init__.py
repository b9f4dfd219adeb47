"""Collection: plans, scheduler, telemetry batches, last-known state, fault changes.
May import: config, wire, policy, store, bus, uds, core, metrics, errors. Never the fleet link or the system face."""
