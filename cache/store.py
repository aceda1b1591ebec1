"""HDF5 array stores: teacher embeddings, view parameters, student features, pixels.

HDF5 writes a store once, whole: ``create`` builds it under a temporary name with every dataset
contiguous and allocated, writes the arrays known at creation, fsyncs, reserves the file's
blocks (``posix_fallocate``) and renames it into place. After that, rows are written by
``Rows`` with positional writes at the datasets' fixed offsets, never through HDF5: the file's
metadata is never touched again, so a full disk or a killed writer can cost only the block being
written (an ``OSError`` naming the file, not a crash inside the HDF5 library), and the ``status``
rows say what is complete. Readers load whole datasets with one contiguous read, or map them
(``mapped``); per-row fancy indexing in HDF5 is about 100x slower than indexing an array.
"""
import errno
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from cache import atomic, space
from cache.errors import UserError

FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2


def create(path, datasets: dict, attrs: dict, data: dict | None = None, advice: str | None = None,
           name: str | None = None) -> None:
    """Create ``path`` atomically with ``datasets`` (name -> (shape, dtype)), ``attrs`` and the
    arrays of ``data`` (name -> array) written; refused first, with ``advice``, if the disk cannot
    hold it (``name``: the file's name in that message, when ``path`` is a temporary one).

    Attribute values that are not strings or numbers are stored as prefixed JSON strings.
    """
    path = Path(path)
    needed = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in datasets.values())
    space.require(path.parent, needed, name or path.name, advice)
    with atomic.replacing(path) as tmp:
        _in_child(lambda: _write_new(tmp, datasets, attrs, data or {}), tmp)
        with open(tmp, "r+b") as f:  # every block reserved now: row writes never meet a full disk
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def _write_new(tmp, datasets: dict, attrs: dict, data: dict) -> None:
    with h5py.File(tmp, "w", track_order=True) as f:
        for name, (shape, dtype) in datasets.items():
            _create_preallocated(f, name, shape, dtype)
        for name, array in data.items():
            f[name][...] = array
        write_attrs(f, {"format_version": FORMAT_VERSION, **attrs})


def _in_child(write, path) -> None:
    """Run ``write`` in a forked child. HDF5 that meets a full disk while it writes metadata can
    crash its process (or leave it unable to close the file); in a child that costs only the
    temporary file, and the command reports the failed write."""
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # HDF5's complaints while it fails; the parent says it
        try:
            write()
            code = 0
        except OSError as e:
            code = space.os_error(e)[0] or errno.EIO
        except BaseException:
            code = errno.EIO
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        if code < 0 or code == errno.EIO:  # killed by a signal, or no errno: a full disk says so
            code = errno.ENOSPC if space.free_bytes(Path(path).parent) < space.MARGIN else errno.EIO
        raise OSError(code, os.strerror(code), str(path))


class Rows:
    """Positional writes of whole rows into a store's contiguous datasets (``with Rows(path) as rows``).

    The datasets were allocated at creation, so a write only replaces bytes inside the file: HDF5
    is not involved, and a failed write is an ``OSError`` that names the file.
    """

    def __init__(self, path):
        self.path = Path(path)
        with reading(self.path) as f:
            self.layout = {name: (ds.id.get_offset(), ds.shape, ds.dtype) for name, ds in f.items()
                           if isinstance(ds, h5py.Dataset) and ds.id.get_offset() is not None}
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def _span(self, name: str, start: int, n: int) -> tuple[int, int, np.dtype]:
        offset, shape, dtype = self.layout[name]
        row = int(np.prod(shape[1:])) * dtype.itemsize
        if start < 0 or start + n > shape[0]:
            raise IndexError(f"{self.path}: rows {start}..{start + n} outside {name} [{shape[0]}]")
        return offset + start * row, n * row, dtype

    def write(self, name: str, start: int, array: np.ndarray) -> None:
        offset, size, dtype = self._span(name, start, len(array))
        data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
        assert len(data) == size, (name, len(data), size)
        view = memoryview(data)
        while view:  # a short write is retried for the rest; a full disk raises
            written = self._named(os.pwrite, self.fd, view, offset)
            view, offset = view[written:], offset + written

    def _named(self, call, *args):
        try:
            return call(*args)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def read(self, name: str, start: int, n: int) -> np.ndarray:
        offset, size, dtype = self._span(name, start, n)
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(errno.EIO, "short read", str(self.path))
        return np.frombuffer(data, dtype.newbyteorder("<")).reshape(n, *self.layout[name][1][1:])

    def mark_pending(self, ranges) -> None:
        """The rows of ``ranges`` pending again (``status`` 0): what the next build redoes."""
        for rows in ranges:
            self.write("status", rows.start, np.full(len(rows), PENDING, np.uint8))

    def sync(self) -> None:
        """Everything written so far is on disk (a lost write raises here)."""
        self._named(os.fsync, self.fd)


def blocks(n: int, block: int) -> list:
    """The rows of every block: fixed runs of ``block`` rows, the last one shorter."""
    return [range(start, min(start + block, n)) for start in range(0, n, block)]


def pending_blocks(status: np.ndarray, block: int) -> list:
    """The blocks (of ``status``'s rows) that still have a pending row: what a resume redoes."""
    return [b for b in blocks(len(status), block) if (status[b.start:b.stop] == PENDING).any()]


def mismatches(existing: dict, wanted: dict, keys) -> list:
    """The identity attributes (``keys``) on which an existing store differs from the wanted one
    (compared as JSON, so a tuple equals the list it was stored as)."""
    return [k for k in keys if _as_json(existing.get(k)) != _as_json(wanted.get(k))]


def _as_json(value) -> str:
    return json.dumps(value, sort_keys=True)


@contextmanager
def reading(path):
    """Open a store read-only. HDF5 file locking is off, so a reader never fails on a writer (whose
    rows are only trusted once their status says done); a damaged file is one clear error."""
    try:
        f = h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno not in (None, 0):
            raise
        raise UserError(f"{path} is damaged or not an HDF5 file ({e}); "
                        f"{repair_hint(path)}")
    with f:
        yield f


def readable(path) -> bool:
    """Opens as HDF5, and no contiguous dataset runs past the end of the file (a truncated file)."""
    try:
        with reading(path) as f:
            attributes(f)
            ends = [ds.id.get_offset() + ds.id.get_storage_size() for ds in f.values()
                    if isinstance(ds, h5py.Dataset) and ds.id.get_offset() is not None]
        return max(ends, default=0) <= os.path.getsize(path)
    except (UserError, OSError):
        return False


# Datasets that checksum (or index) the rest of a store: together with the attributes they are
# its identity, so a 100+ GB store is fingerprinted without reading its arrays.
CHECKSUM_DATASETS = ("block_sha256", "view_crc32", "status", "offsets")


def content_hash(path) -> str | None:
    """sha256 of a store's attributes and checksum datasets; None for a file that is not a store
    with checksums (hash it whole). Damage that these do not see is found where the rows are
    read, by their checksums."""
    try:
        with reading(path) as f:
            names = [name for name in CHECKSUM_DATASETS if name in f]
            if not any(name in f for name in ("block_sha256", "view_crc32")):
                return None
            digest = hashlib.sha256(json.dumps(attributes(f), sort_keys=True).encode())
            for name in names:
                digest.update(name.encode() + np.ascontiguousarray(f[name][()]).tobytes())
            return "store-" + digest.hexdigest()
    except (UserError, OSError):  # not HDF5 at all
        return None


def repair_hint(path) -> str:
    """What to run to recompute a damaged file, by the stage folder it is in."""
    path = Path(path)
    run = next((p for p in path.parents if (p / "extract").is_dir()), path.parent)
    stage = path.relative_to(run).parts[0] if path.is_relative_to(run) else ""
    command = {"extract": "pipeline extract --data ROOT", "features": "pipeline align",
               "align": "pipeline align", "distill": "pipeline distill"}.get(stage, "the stage that wrote it")
    return f"run `{command} --run {run}` with the same settings to recompute it"


def _create_preallocated(f: h5py.File, name: str, shape, dtype) -> None:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)  # one run of bytes at a fixed offset
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # reserved by posix_fallocate instead: reads as zeros
    dcpl.set_obj_track_times(False)  # identical bytes for identical content
    tid = h5py.h5t.py_create(np.dtype(dtype), logical=True)
    space = h5py.h5s.create_simple(tuple(shape))
    h5py.h5d.create(f.id, name.encode(), tid, space, dcpl=dcpl)


JSON_PREFIX = "json:"


def write_attrs(f: h5py.File, attrs: dict) -> None:
    """Strings and numbers as themselves; anything else (None, lists, dicts) as ``json:...``."""
    for key, value in attrs.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            value = JSON_PREFIX + json.dumps(value)
        f.attrs[key] = value


def read_attrs(path) -> dict:
    """Attributes of the store, with JSON-encoded values decoded."""
    with reading(path) as f:
        return attributes(f)


def attributes(f: h5py.File) -> dict:
    """Attributes of an open store, with JSON-encoded values decoded."""
    return {key: _decode(value) for key, value in f.attrs.items()}


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith(JSON_PREFIX):
        return json.loads(value[len(JSON_PREFIX):])
    if isinstance(value, np.generic):
        return value.item()
    return value


def read(path, name: str) -> np.ndarray:
    """Load one whole dataset into memory with a single contiguous read."""
    with reading(path) as f:
        return f[name][()]


def mapped(path, name: str) -> np.ndarray:
    """One dataset mapped from the file instead of loaded: pages are read when touched and can be
    dropped again, so memory does not grow with the file. Copy-on-write: writes to the array never
    reach the file. Loaded whole when it is not one contiguous run (a virtual dataset over shards)."""
    with reading(path) as f:
        ds = f[name]
        offset, shape, dtype = ds.id.get_offset(), ds.shape, ds.dtype
        if offset is None or ds.chunks is not None or 0 in shape:
            return ds[()]
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="c", offset=offset, shape=shape)


def shapes(path) -> dict:
    with reading(path) as f:
        return {name: (tuple(ds.shape), str(ds.dtype)) for name, ds in f.items()}
