"""The lease's records on a local or network file system.

A record is written to a unique temporary file, then hard-linked to its generation name
(``link`` fails if the name exists: atomic on POSIX file systems, NFS and Lustre included,
and a reader never sees a half-written record). Where hard links are not supported,
``open(O_CREAT | O_EXCL)``.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

from dreg.errors import StorageError
from dreg.io.ownership.records import GENERATION, LEASE_DIR, Backend, record_name

# Temporary files of writers that died are removed once this old (by their modification
# time, the file system's clock).
TEMPORARY_MAX_AGE_S = 600.0


class LocalBackend(Backend):
    def __init__(self, uri: str):
        self.uri = uri
        self.directory = Path(uri) / LEASE_DIR

    def _fail(self, exc: OSError) -> StorageError:
        return StorageError(
            f"{self.uri}: cannot read or write its ownership record: "
            f"{exc.strerror or type(exc).__name__}"
        )

    def generations(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._fail(exc) from None
        return [int(m.group(1)) for m in map(GENERATION.match, names) if m]

    def read(self, generation: int) -> tuple[bytes, float] | None:
        try:
            with open(self.directory / record_name(generation), "rb") as handle:
                return handle.read(), os.fstat(handle.fileno()).st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fail(exc) from None

    def create(self, generation: int, data: bytes) -> bool:
        target = self.directory / record_name(generation)
        temporary = self.directory / f"tmp-{uuid.uuid4().hex}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_new(temporary, data)
            try:
                os.link(temporary, target)
                return True
            except FileExistsError:
                # On NFS a retransmitted LINK whose reply was lost reports EEXIST although
                # it succeeded: then the temporary file has two names.
                return os.stat(temporary).st_nlink >= 2
            except OSError:  # no hard links here (some FUSE, SMB, FAT): exclusive create
                try:
                    _write_new(target, data)
                    return True
                except FileExistsError:
                    return False
        except OSError as exc:
            raise self._fail(exc) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    def now(self) -> float:
        """The file system's clock: the modification time of a file created now (on a
        network file system the server's clock, which dates the records too)."""
        probe = self.directory / f"tmp-now-{uuid.uuid4().hex}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                return os.fstat(fd).st_mtime
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError:  # no folder (no record either) or read-only: this machine's clock
            return time.time()

    def delete(self, generation: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / record_name(generation))

    def clean_temporary(self) -> None:
        # Compared with modification times written by the file system: the real clock,
        # whatever clock the lease keeps.
        now = time.time()
        for entry in os.scandir(self.directory):
            if entry.name.startswith("tmp-"):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > TEMPORARY_MAX_AGE_S:
                        os.unlink(entry.path)


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` (FileExistsError if it exists), write `data` and flush it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
