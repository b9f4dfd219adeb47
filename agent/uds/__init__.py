"""UDS (ISO 14229): one request/response exchange (transaction), answers read (answers, response),
seed-to-key plugins (keys), and the executor that runs a command on an ECU, physically or functionally.
The pure DID codecs and DTC decoding it uses are in wire.
May import: bus (through the Link protocol), wire, config, errors."""
