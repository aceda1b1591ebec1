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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
