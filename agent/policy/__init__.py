"""Policy: what a component accepts (admission) and who may ask (signed commands, roles), decided before
anything is queued or reaches the bus. Pure, but for reading key files. May import: wire, config, errors."""
