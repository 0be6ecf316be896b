"""The subcommands of `zerowire`. A handler reports a user error by raising CommandError; the front
(`zerowire.cli`) writes it to stderr as `zerowire COMMAND: message` and exits with its code."""

from __future__ import annotations


class CommandError(Exception):
    """A user error of a command (bad options, unreachable coordinator, failed run): a clear message and
    an exit code, never a traceback."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
