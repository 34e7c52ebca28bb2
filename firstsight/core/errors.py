"""Errors meant for the user: printed as one clear message, never as a traceback."""


class FirstSightError(Exception):
    """A problem the user can fix (bad config, missing model, unsupported combination)."""


class ConfigError(FirstSightError):
    """The composed config asks for something invalid; raised before anything is built."""


class RunFailed(FirstSightError):
    """The job started and failed at run time (out of memory, a non-finite loss), not because of
    a bad value: in a sweep that Hydra's basic launcher runs in-process, the other points still run."""


class OutOfMemory(RunFailed):
    """The device (or the host) ran out of memory; the message gives the batch settings, the
    memory figures and what to change."""
