"""ECU simulator: real UDS servers over ISO-TP on any python-can bus, driven by YAML, with fault injection."""
