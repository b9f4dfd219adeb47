"""Configuration: YAML in, frozen typed objects out, every error reported at once with its path.
May import: errors."""

from agent.config.model import AgentConfig, BusConfig, DidSpec, EcuConfig
from agent.config.parse import load_config, parse_config

__all__ = ["AgentConfig", "BusConfig", "DidSpec", "EcuConfig", "load_config", "parse_config"]
