"""Append-only JSON-lines files (``RUN/results.jsonl``): one whole line per write, safe when
several processes append at once, and a line torn by a crash is cut off before the next append.
A damaged line elsewhere (a flipped byte) is skipped with a warning and left in the file."""
import errno
import fcntl
import json
import os

from cache.progress import say

_warned = set()  # (file, line number, line) already reported by this process


def append(path, row: dict) -> None:
    line = (json.dumps(row, allow_nan=False) + "\n").encode()  # strict JSON: no NaN
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one appender at a time, so the repair below cannot race
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        if data and not data.endswith(b"\n"):  # a torn last line from a crashed writer
            os.ftruncate(fd, data.rfind(b"\n") + 1)
        end = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as e:  # a full disk: no half row is left behind, and the file is named
            os.ftruncate(fd, end)
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)  # also releases the lock


def rows(path) -> list:
    """Every complete, readable row (a torn last line is ignored, a damaged one skipped)."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")[:-1]
    except FileNotFoundError:
        return []
    found = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError:  # bad JSON and bad UTF-8 alike
            if (str(path), number, line) not in _warned:  # once per process, not at every read
                _warned.add((str(path), number, line))
                say(f"warning: {path} line {number} is damaged (not a JSON object): skipped and left in the "
                    f"file; its evaluation's metrics.json still holds the row")
            continue
        found.append(row)
    return found
