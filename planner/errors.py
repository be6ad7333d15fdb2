"""The one error type the CLI turns into a single line and a non-zero exit."""


class QPlanError(Exception):
    """A user-facing error: the message is one line that says what is wrong and how to fix it."""
