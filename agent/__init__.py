"""sovd-edge-agent: the in-vehicle half of a SOVD fleet system (MQTT in, UDS on CAN, results out)."""

__version__ = "0.1.0"
