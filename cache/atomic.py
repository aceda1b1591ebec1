"""Files written whole or not at all: into a temporary name beside the target, then renamed over it.

A crash or a full disk leaves the previous file (or none), never half of a new one; the
temporary file of a failed write is removed.
"""
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path, suffix: str = ".tmp"):
    """Yield the temporary path to write; on success it replaces ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        with open(tmp, "rb") as written:  # on disk before it is given the name (a lost write raises here)
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and (not e.filename or str(e.filename) == str(tmp)):
            e.filename = str(path)  # the file the user knows (a failed write() names none)
        raise
    directory = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power cut
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_bytes(path, data: bytes) -> None:
    """``path`` holds ``data`` whole, or keeps what it held (plain writes: a full disk is an OSError)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
