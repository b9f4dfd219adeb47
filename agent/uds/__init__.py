"""UDS (ISO 14229): pure codecs and request builders, and the executor that runs commands on an ECU."""
