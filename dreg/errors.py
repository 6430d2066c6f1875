"""Errors a user can act on. The CLI prints their message without a traceback."""


class DregError(Exception):
    """An expected error with a message that names the input and what is wrong."""


class InputError(DregError):
    """An input (image, URI, parameter, configuration) is missing or invalid."""


class StorageError(DregError):
    """A storage location cannot be reached, read or written.

    `transient` says whether trying again may help (an endpoint that does not answer)
    or not (a chunk whose bytes cannot be decoded)."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):
        return (type(self), (str(self), self.transient))


class RunFailed(DregError):
    """A run went through but its result must not be used (for example no block of the
    last stage succeeded). The CLI exits with status 1, not 2: the input was fine."""


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """The informative line of an exception's (or a state's) message, for a one-line
    report.

    ITK and elastix put the cause on an 'ITK ERROR' or 'Description:' line of a long
    message; elsewhere the first line is the cause. Falls back to the exception's type.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "ITK ERROR" in line:
            return (line.split("):", 1)[-1].strip() or line)[:limit]
    for line in lines:
        if line.lower().startswith(("description:", "error:")):
            return (line.split(":", 1)[-1].strip() or line)[:limit]
    fallback = exc if isinstance(exc, str) else type(exc).__name__
    return (lines[0] if lines else fallback)[:limit]


def describe(exc: BaseException) -> str:
    """'Type: first line', for exceptions whose type says something the text does not."""
    text = first_line(exc)
    name = type(exc).__name__
    return name if text == name else f"{name}: {text}"
