"""Errors shared by the sharders and the loader."""


class InputError(ValueError):
    """Bad user input; the message names the file (and line) and what was expected."""


class BadDataError(RuntimeError):
    """More unreadable samples than the configured threshold allows."""
