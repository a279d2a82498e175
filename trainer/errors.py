"""The one exception type for bad user input: the CLI prints its message as a single line."""


class ConfigError(ValueError):
    """A value the user gave is not allowed. The message names the value and what is allowed."""
