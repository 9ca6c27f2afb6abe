"""Errors a user causes and can fix, reported as one line naming the value and the fix.

The entry points print these without a traceback; any other exception is a bug and keeps its
traceback. They subclass ValueError, so code that validates input with `except ValueError`
still sees them.
"""


class UserError(ValueError):
    """A problem with what the user gave: configuration, data or checkpoint."""


class ConfigError(UserError):
    """A configuration value or combination of values that cannot run."""


class DataError(UserError):
    """Training data that cannot feed the run (missing, empty, without targets)."""


class NonFiniteError(UserError):
    """Too many steps in a row with a non-finite loss or gradient norm: the run diverged."""
