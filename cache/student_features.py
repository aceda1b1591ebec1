"""The frozen student's features, ``RUN/features/<student>/features.h5``: layout, writer, reader.

``features`` [images, views, student_dim] float16: the eval-mode student's feature of every
recorded view (row ``i`` is row ``i`` of ``index.parquet``), and ``block_sha256`` [blocks, 32]:
the sha256 of each block of ``BLOCK`` rows, checked on every read, so damage is found and only
the damaged blocks are recomputed. Attributes: the student's name, weights and input spec.
Written whole to a temporary file and renamed, so it is either complete or absent; a repair
rewrites the damaged blocks in place.
"""
import hashlib
from pathlib import Path

import numpy as np
import torch

from cache import store
from cache.errors import UserError

FILE = "features.h5"
CHECKSUMS = "block_sha256"
BLOCK = 1024  # rows per checksum


def _checksums(features: np.ndarray) -> np.ndarray:
    return np.stack([np.frombuffer(hashlib.sha256(np.ascontiguousarray(features[b.start:b.stop])).digest(), np.uint8)
                     for b in store.blocks(len(features), BLOCK)] or [np.zeros(32, np.uint8)])


def write(path, features: np.ndarray, attrs: dict) -> None:
    path, features = Path(path), features.astype(np.float16)
    checksums = _checksums(features)
    store.create(path, {"features": (features.shape, np.float16), CHECKSUMS: (checksums.shape, np.uint8)},
                 {**attrs, "block": BLOCK}, {"features": features, CHECKSUMS: checksums})


def damaged_rows(path, features: np.ndarray | None = None) -> list:
    """The rows of every block that no longer matches its checksum."""
    features = store.read(path, "features") if features is None else features
    return [b for b, digest in zip(store.blocks(len(features), BLOCK), store.read(path, CHECKSUMS))
            if not np.array_equal(_checksums(features[b.start:b.stop])[0], digest)]


def repair(path, features: np.ndarray, blocks: list) -> None:
    """Rewrite ``blocks`` (row ranges) of ``path`` from ``features``, recomputed for those rows."""
    with store.Rows(path) as out:
        for b in blocks:
            rows = features[b.start:b.stop].astype(np.float16)
            out.write("features", b.start, rows)
            out.write(CHECKSUMS, b.start // BLOCK, _checksums(rows))
        out.sync()


def read(path) -> torch.Tensor:
    """[images, views, dim] float16, refused when a block no longer matches its checksum."""
    features = store.read(path, "features")
    damaged = damaged_rows(path, features)
    if damaged:
        raise UserError(f"{path} is damaged: {len(damaged)} blocks of rows do not match their checksums; "
                        f"{store.repair_hint(path)} (only those blocks are recomputed)")
    return torch.from_numpy(features)
