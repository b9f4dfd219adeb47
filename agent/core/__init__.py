"""The diagnostic core: per-component workers running commands on UDS executors over the bus.
May import: uds, bus, policy, wire, config, errors. Never the fleet link, the system face or dev tools."""
