"""Errors a user can act on. The CLI prints their message without a traceback."""

import re


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


# A URI's user information (``scheme://USER:SECRET@host``): credentials never leave in text.
USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*@")
# A C++ source location that ITK puts before its message (``/path/itkNrrdImageIO.cxx:410:``).
SOURCE_LOCATION = re.compile(r"^\S+\.(?:cxx|cpp|cc|hxx|h|txx):\d+:?\s*")
MAX_LINE = 1000  # characters of an error line the CLI prints


def redact(text: str) -> str:
    """`text` with the user information (credentials) of every URI in it removed:
    ``s3://KEY:SECRET@bucket/key`` becomes ``s3://***@bucket/key``. The one place that
    does so: messages, event resources and logs all pass through it."""
    return USERINFO.sub(r"\1***@", str(text))


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """`text` as one line of at most `limit` characters, credentials redacted: line
    breaks become "; ", and a longer text is cut with a note of its length."""
    parts = [part.strip() for part in str(text).splitlines() if part.strip()]
    line = redact("; ".join(parts))
    if len(line) > limit:
        line = f"{line[: limit - 40]}… ({len(line)} characters, cut)"
    return line


def _itk_cause(lines: list[str], at: int) -> str:
    """ITK's message on line `at` (after 'itk::ERROR: Class(0x…): '), with the last
    line of detail when the message only announces it ('Error reading FILE:')."""
    line = lines[at]
    text = line.split("):", 1)[-1].strip() if "):" in line else line.split("ERROR:", 1)[-1]
    text = text.strip() or line
    if text.endswith(":") and at + 1 < len(lines):
        text = f"{text} {lines[-1]}"
    return text


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """The informative line of an exception's (or a state's) message, for a one-line
    report.

    ITK and elastix put the cause on an 'ITK ERROR' / 'itk::ERROR' or 'Description:'
    line of a long message, after a line naming a C++ source file (never the cause);
    elsewhere the first line is the cause. Falls back to the exception's type.
    """
    lines = [SOURCE_LOCATION.sub("", line.strip()) for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for at, line in enumerate(lines):
        if "ITK ERROR" in line or "itk::ERROR" in line:
            return redact(_itk_cause(lines, at))[:limit]
    for line in lines:
        if line.lower().startswith(("description:", "error:")):
            return redact(line.split(":", 1)[-1].strip() or line)[:limit]
    fallback = exc if isinstance(exc, str) else type(exc).__name__
    return redact(lines[0] if lines else fallback)[:limit]


def describe(exc: BaseException) -> str:
    """'Type: first line', for exceptions whose type says something the text does not."""
    text = first_line(exc)
    name = type(exc).__name__
    return name if text == name else f"{name}: {text}"
