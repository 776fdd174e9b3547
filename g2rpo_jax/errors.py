"""User-facing error types, in a module without project imports so any module can raise them, and
how a command turns them into its exit code."""

import sys
from typing import Callable


class ConfigError(ValueError):
    """A user error in the configuration; its message is one line naming the key and the fix."""


def command_exit_code(body: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run a command's ``body``: 0 when it returns; a ConfigError prints ``error: <message>`` to stderr
    and gives 2; Ctrl-C prints ``interrupted`` and gives 130."""
    try:
        body()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0
