"""Errors meant for the person at the terminal: one line naming the cause and the fix."""


class UserError(Exception):
    """Raised for conditions the user can fix; the CLI prints it without a traceback."""
