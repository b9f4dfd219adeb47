"""The system face: the daemon's assembly (service), systemd notify, logging setup, doctor, and the
in-process session behind `uds`. May import every product layer; never dev tools (the CLI wires those in)."""
