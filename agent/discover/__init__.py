"""Finding a vehicle's ECUs from the bus: passive listening, the OBD-II functional request, an opt-in
TesterPresent scan, identification DIDs, and the `ecus:` config that results. A tool's layer, used by
`sovd-edge discover` and `doctor` with a bus connection of their own; the daemon never runs it.
It only ever sends OBD-II services 0x01 and 0x09 and UDS 0x22 and 0x3E (enforced in tap.py).
May import: bus, uds, metrics, wire, config, errors."""
