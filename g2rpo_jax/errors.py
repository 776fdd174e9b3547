"""User-facing error types, in a module without imports so any module can raise them."""


class ConfigError(ValueError):
    """A user error in the configuration; its message is one line naming the key and the fix."""
