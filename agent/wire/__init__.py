"""The wire vocabulary of protocol v1: commands and results as types, their validation, and every
message the agent sends. Pure. May import: config, errors, uds codecs (to resolve DIDs and DTC codes)."""
