"""Errors a user can act on. The CLI prints their message without a traceback."""


class DregError(Exception):
    """An expected error with a message that names the input and what is wrong."""


class InputError(DregError):
    """An input (image, URI, parameter, configuration) is missing or invalid."""


class StorageError(DregError):
    """A storage location cannot be reached, read or written."""
