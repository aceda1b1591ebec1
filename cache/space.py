"""Free space, checked before work starts, and full-disk errors said as one sentence.

A stage that knows how much it will write asks ``require`` first, so a disk too small is refused
before any work instead of failing half-way. ``PIPELINE_SKIP_SPACE_CHECK=1`` skips the check for
filesystems whose free space ``statvfs`` misreports (some network and quota filesystems); the
writes themselves still fail cleanly.
"""
import errno
import os
import re
from pathlib import Path

from cache.errors import UserError

MARGIN = 256 * 1024  # HDF5 metadata, manifests and logs beside the arrays
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def free_bytes(path) -> int:
    """Bytes free to this user on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def require(path, needed: int, what: str, advice: str | None = None, margin: int = MARGIN) -> None:
    """Refuse with one line when the filesystem of ``path`` has less than ``needed`` + ``margin`` free."""
    if os.environ.get("PIPELINE_SKIP_SPACE_CHECK") == "1":
        return
    free = free_bytes(path)
    if free < needed + margin:
        raise UserError(f"{what} needs {human(needed + margin)}, {human(free)} free on {_mount(path)}: "
                        f"{advice or 'free space or choose another --run folder'}")


def _mount(path) -> str:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


# HDF5 (and Arrow) report a failed write as their own string with "errno = 28" ("[errno 28]")
# inside and no errno attribute.
_HDF5_ERRNO = re.compile(r"errno[ =]+(\d+)", re.IGNORECASE)
_HDF5_FILE = re.compile(r"filename = '([^']*)'")


def os_error(e: OSError) -> tuple[int | None, str | None]:
    """(errno, filename) of an OSError, also when HDF5 wrote them only into its message."""
    code, name = e.errno, e.filename
    if code is None:
        found = _HDF5_ERRNO.search(str(e))
        code = int(found.group(1)) if found else None
    if not name:
        found = _HDF5_FILE.search(str(e))
        name = found.group(1) if found else None
    return code, name


def sentence(e: OSError) -> str | None:
    """A failed write as one sentence: the file, the errno as words and, for a full disk, what is
    free. None when the error is not an environment failure the user can act on."""
    code, name = os_error(e)
    if code not in (*NO_SPACE, errno.EACCES, errno.EROFS, errno.EIO, errno.ENOENT):
        return None
    where = name or "a file of the run folder"
    text = f"{os.strerror(code)}: {where}"
    if code in NO_SPACE and name:
        text += f" ({human(free_bytes(Path(name).parent))} free on {_mount(Path(name).parent)})"
    return text
