"""Typed training configuration: dataclasses, YAML loading, `--set` overrides, validation."""
from hipscale.config.errors import ConfigError
from hipscale.config.loader import config_to_dict, config_to_yaml, load_config
from hipscale.config.schema import JobConfig

__all__ = ["ConfigError", "JobConfig", "config_to_dict", "config_to_yaml", "load_config"]
