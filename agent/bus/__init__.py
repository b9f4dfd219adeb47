"""The CAN side: one owner of the bus, ISO-TP links per ECU (userspace or kernel).
May import: config, errors."""
