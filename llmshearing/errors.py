"""Errors meant for the user: raised before any work starts, with the key and the fix in the message."""


class ConfigError(ValueError):
    """A configuration or input that cannot work. The message names the key and how to fix it."""
