"""The wire vocabulary of protocol v1: commands and results as types, their validation, and every
message the agent sends, with the DID codecs and DTC decoding they use. Pure. May import: config, errors."""
