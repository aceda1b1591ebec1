"""The frozen student's features, ``RUN/features/<student>/features.h5``: layout, writer, reader.

One dataset, ``features`` [images, views, student_dim] float16: the eval-mode student's feature
of every recorded view (row ``i`` is row ``i`` of ``index.parquet``). Attributes: the student's
name, weights and input spec. Written whole to a temporary file and renamed, so it is either
complete or absent.
"""
from pathlib import Path

import h5py
import numpy as np
import torch

from cache import atomic, store

FILE = "features.h5"


def write(path, features: np.ndarray, attrs: dict) -> None:
    path = Path(path)
    with atomic.replacing(path, ".partial") as tmp:
        store.create(tmp, {"features": (features.shape, np.float16)}, attrs)
        with h5py.File(tmp, "r+") as f:
            f["features"][...] = features.astype(np.float16)


def read(path) -> torch.Tensor:
    """[images, views, dim] float16."""
    return torch.from_numpy(store.read(path, "features"))
