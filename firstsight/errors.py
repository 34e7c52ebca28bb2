"""Errors meant for the user: printed as one clear message, never as a traceback."""


class FirstSightError(Exception):
    """A problem the user can fix (bad config, missing model, unsupported combination)."""


class ConfigError(FirstSightError):
    """The composed config asks for something invalid; raised before anything is built."""
