"""The system face: the daemon's assembly (service), systemd notify, logging setup, doctor, and the
in-process session behind `uds`. May import: collect, core, fleet, metrics, store, uds, bus, policy, wire,
config, clock, errors, discover (for doctor); never dev tools (the CLI wires those in) nor odx."""
