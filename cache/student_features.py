"""The frozen student's features, ``RUN/features/<student>/features.h5``: layout, writer, reader.

``features`` [images, views, student_dim] float16: the eval-mode student's feature of every
recorded view (row ``i`` is row ``i`` of ``index.parquet``), and ``block_sha256`` [blocks, 32]:
the sha256 of each block of ``BLOCK`` rows. A block whose checksum is all zeros is pending (no
sha256 is all zeros). Attributes: the student's name, weights and input spec, and ``block``.

The file is created whole with every block pending, then filled block by block with positional
writes: a block's checksum is written only once its rows are on disk and read back intact, so a
killed or interrupted build resumes with the pending blocks, and no more than one block is ever
held in memory. Readers map the file (no copy in memory) and check every block against its
checksum; a damaged block is marked pending again, so the next build recomputes just it.
"""
import errno
import hashlib
from pathlib import Path

import numpy as np
import torch

from cache import store
from cache.errors import UserError

FILE = "features.h5"
CHECKSUMS = "block_sha256"
BLOCK = 1024  # rows per checksum
IDENTITY_KEYS = ("student", "student_weights", "student_size", "resolved_weights", "input_spec", "block")


class DamagedFeatures(UserError):
    """Blocks that no longer match their checksums (now marked pending: the next build redoes them)."""


def _checksum(rows: np.ndarray) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(np.ascontiguousarray(rows)).digest(), np.uint8)


def prepare(path, n_rows: int, n_views: int, dim: int, attrs: dict, force: bool = False) -> list:
    """The blocks still to compute, creating ``path`` with every block pending when it is missing,
    unreadable, made for another student or shape, or ``force``."""
    path, attrs = Path(path), {**attrs, "block": BLOCK}
    shape = (n_rows, n_views, dim)
    if path.exists() and not force and store.readable(path):
        existing = store.read_attrs(path)
        if not store.mismatches(existing, attrs, IDENTITY_KEYS) and store.shapes(path)["features"][0] == shape:
            return pending(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    store.create(path, {"features": (shape, np.float16), CHECKSUMS: ((max(1, -(-n_rows // BLOCK)), 32), np.uint8)},
                 attrs)
    return store.blocks(n_rows, BLOCK)


def pending(path) -> list:
    """The row ranges of the blocks not yet computed (or marked damaged)."""
    checksums = store.read(path, CHECKSUMS)
    n_rows = store.shapes(path)["features"][0][0]
    return [b for b, digest in zip(store.blocks(n_rows, BLOCK), checksums) if not digest.any()]


def write_block(rows: store.Rows, block: range, features: np.ndarray) -> None:
    """One block's rows, then (once they read back intact) its checksum."""
    features = features.astype(np.float16)
    rows.write("features", block.start, features)
    rows.sync()
    if not np.array_equal(rows.read("features", block.start, len(block)), features):
        raise OSError(errno.EIO, "written rows did not read back intact", str(rows.path))
    rows.write(CHECKSUMS, block.start // BLOCK, _checksum(features)[None])
    rows.sync()


def mark_pending(path, blocks: list) -> None:
    with store.Rows(path) as rows:
        for b in blocks:
            rows.write(CHECKSUMS, b.start // BLOCK, np.zeros((1, 32), np.uint8))
        rows.sync()


def read(path) -> torch.Tensor:
    """[images, views, dim] float16, mapped from the file (copy-on-write: nothing is loaded), each
    block checked against its checksum. A pending block is refused; damaged ones are marked
    pending and refused (``DamagedFeatures``)."""
    features, checksums = store.mapped(path, "features"), store.read(path, CHECKSUMS)
    every = store.blocks(len(features), BLOCK)
    if any(not digest.any() for digest in checksums[:len(every)]):
        raise UserError(f"{path} is not complete; {store.repair_hint(path)}")
    damaged = [b for b, digest in zip(every, checksums) if not np.array_equal(_checksum(features[b.start:b.stop]), digest)]
    if damaged:
        try:
            mark_pending(path, damaged)
        except OSError:
            pass  # read-only: the error still names the damage
        raise DamagedFeatures(f"{path} is damaged: {len(damaged)} blocks of rows do not match their checksums")
    return torch.from_numpy(features)
