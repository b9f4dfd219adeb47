"""UDS (ISO 14229): pure codecs, DTC decoding, transactions and the executor that runs a command on an ECU.
May import: bus (through the Link protocol), wire, config, errors."""
