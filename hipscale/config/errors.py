"""The one exception type of configuration problems."""


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key path."""
