"""Tools around the agent for development and demos: the ECU simulator, the socketcand hub and a private
Mosquitto. May import: core, uds, bus, wire, config, errors. The product layers never import it (only the
CLI and tests do)."""
