"""Append-only JSON-lines files (``RUN/results.jsonl``): one whole line per write, safe when
several processes append at once, and a line torn by a crash is cut off before the next append."""
import fcntl
import json
import os


def append(path, row: dict) -> None:
    line = (json.dumps(row, allow_nan=False) + "\n").encode()  # strict JSON: no NaN
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one appender at a time, so the repair below cannot race
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        if data and not data.endswith(b"\n"):  # a torn last line from a crashed writer
            os.ftruncate(fd, data.rfind(b"\n") + 1)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # also releases the lock


def rows(path) -> list:
    """Every complete row (a torn last line is ignored)."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]
