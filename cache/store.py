"""HDF5 array stores: teacher embeddings, view parameters, student features.

Datasets are created at full size with their space allocated up front, so later writes only
touch raw data and never the file's metadata: a killed writer leaves a readable file whose
``status`` rows say what is complete. Readers load whole datasets with one contiguous read;
per-row fancy indexing in HDF5 is about 100x slower than indexing the array in memory.
"""
import json
import os
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from cache import atomic
from cache.errors import UserError

FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2


def create(path, datasets: dict, attrs: dict) -> None:
    """Create ``path`` atomically with ``datasets`` (name -> (shape, dtype)) and ``attrs``.

    Attribute values that are not strings or numbers are stored as prefixed JSON strings.
    """
    with atomic.replacing(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        for name, (shape, dtype) in datasets.items():
            _create_preallocated(f, name, shape, dtype)
        write_attrs(f, {"format_version": FORMAT_VERSION, **attrs})
        durable(f)


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


def durable(f: h5py.File) -> None:
    """Flush and fsync: write errors (a full disk) raise here instead of being lost at close."""
    f.flush()
    os.fsync(f.id.get_vfd_handle())


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
    try:
        read_attrs(path)
        return True
    except UserError:
        return False


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
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
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


def shapes(path) -> dict:
    with reading(path) as f:
        return {name: (tuple(ds.shape), str(ds.dtype)) for name, ds in f.items()}
