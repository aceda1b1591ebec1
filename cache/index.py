"""The Parquet image index: one row per image, readable by pyarrow, pandas or duckdb.

Row ``i`` of the index is row ``i`` of every HDF5 store in the run folder.
"""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cache import atomic

METADATA_KEY = b"pipeline"


def write_table(path, columns: dict, metadata: dict) -> None:
    """Write columns (name -> list/array) atomically, with JSON metadata in the schema."""
    path = Path(path)
    table = pa.table(columns)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    with atomic.replacing(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path) -> tuple[dict, dict]:
    """Return (columns as Python lists, metadata dict)."""
    table = pq.read_table(path)
    metadata = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    return table.to_pydict(), metadata
