"""Errors shared by the sharders and the loader."""


class InputError(ValueError):
    """Bad user input; the message names the file (and line) and what was expected."""


class BadDataError(RuntimeError):
    """More unreadable samples than the configured threshold allows."""


class WorkerStalledError(RuntimeError):
    """A DataLoader worker made no progress for the configured time; the message names it and its sample."""


class DatasetChangedError(ValueError):
    """A saved loader position belongs to another dataset (other shards) than the loader reads now."""
