"""Errors that reach the user as one line and an exit status.

The CLI maps :class:`UserError` to exit status 2 (bad input: config keys, names, paths)
and :class:`RuntimeFailure` to exit status 1 (the input was fine but the work failed).
Library code raises these instead of printing, so it stays usable from Python.
"""


class DymuError(Exception):
    """Base of all errors dymu reports to the user without a traceback."""

    exit_code = 1


class UserError(DymuError, ValueError):
    """Bad input from the user: wrong key, name, value, or a missing/malformed file."""

    exit_code = 2


class RuntimeFailure(DymuError, RuntimeError):
    """The input was valid but the work could not be completed."""

    exit_code = 1
