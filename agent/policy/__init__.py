"""Policy: what a component accepts, decided before anything is queued or reaches the bus. Pure.
May import: wire, config, errors."""
