"""The CAN side: one owner of the bus, ISO-TP links per ECU (userspace or kernel), UDS connections."""
