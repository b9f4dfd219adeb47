"""The CAN side: one owner of the bus, ISO-TP links per ECU (userspace or kernel), the interface's state.
May import: config, errors."""
