"""Errors that the command line reports as a one-line message and a non-zero exit."""


class JaxreproError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class ConfigError(JaxreproError, ValueError):
    """A config field is missing, of the wrong type, or has an impossible value."""


class WorkdirError(JaxreproError):
    """A working directory holds another run, or is not a run at all."""


class DataError(JaxreproError, ValueError):
    """A dataset is unknown, unprepared, or unreadable."""


class CheckpointError(JaxreproError):
    """A checkpoint is missing, corrupt, or from another architecture."""
