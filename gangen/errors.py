"""User-facing errors: the CLI prints these as one line and exits non-zero.

Anything that is the user's to fix (a bad value, a missing file) raises one of these, with the
offending value and the fix in the message. Bugs stay ordinary exceptions with a traceback.
"""


class GanGenError(Exception):
    """Base class of errors caused by user input."""


class ConfigError(GanGenError, ValueError):
    """A configuration value is invalid (unknown name, out of range, inconsistent)."""


class DataNotFoundError(GanGenError, FileNotFoundError):
    """A dataset, checkpoint or other input file is missing."""


class DivergenceError(GanGenError):
    """Training produced a non-finite loss, or a generator non-finite images; the CLI exits with status 3."""

    exit_code = 3
