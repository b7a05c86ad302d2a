"""Exceptions a user can cause. The CLI prints them as one line and exits non-zero."""


class ReconError(Exception):
    """A problem the user can fix: message says which file, what is wrong, what to do."""


class ConfigError(ReconError):
    """An unknown setting, a wrong type or a malformed config file."""


class LockedError(ReconError):
    """Another recon process holds the output folder."""


class OutputError(ReconError):
    """The output folder cannot be written (read-only, no permission, disk full); never a reason to skip an input."""
