"""Errors that explain a bad configuration or a missing resource in terms of what to set."""


class ConfigError(ValueError):
    """A config value that cannot work; raised before any heavy work starts."""


class UnavailableError(RuntimeError):
    """A model or data set that is neither available locally nor reachable on the hub."""
