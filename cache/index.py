"""The Parquet image index: one row per image, readable by pyarrow, pandas or duckdb.

Row ``i`` of the index is row ``i`` of every HDF5 store in the run folder.

Damage is detected, not read as garbage: data pages carry Parquet's CRC checksums, and the
schema (column names and types), the row count and our metadata, which live in the unchecked
footer, carry a SHA-256 of their own. Files written without them (older versions, other tools)
are still read.
"""
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cache import atomic
from cache.errors import UserError
from cache.store import repair_hint

METADATA_KEY = b"pipeline"
DIGEST_KEY = b"pipeline.sha256"


def _digest(table: pa.Table, metadata: bytes) -> bytes:
    names_types = [(field.name, str(field.type)) for field in table.schema]
    described = json.dumps([names_types, table.num_rows, metadata.decode()])
    return hashlib.sha256(described.encode()).hexdigest().encode()


def write_table(path, columns: dict, metadata: dict) -> None:
    """Write columns (name -> list/array) atomically, with JSON metadata in the schema."""
    path = Path(path)
    table = pa.table(columns)
    encoded = json.dumps(metadata).encode()
    table = table.replace_schema_metadata({METADATA_KEY: encoded, DIGEST_KEY: _digest(table, encoded)})
    with atomic.replacing(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)


def read_table(path, arrow: bool = False) -> tuple[dict | pa.Table, dict]:
    """Return (columns as Python lists, metadata dict); an unreadable file is a ``UserError``.
    ``arrow``: the columns as the checked ``pa.Table`` instead (no conversion to Python objects)."""
    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as f:
            if f.metadata.metadata is None:  # pyarrow always writes some; a damaged footer may drop it all
                raise ValueError("its footer lost its key-value metadata")
            table = f.read()
        stored = table.schema.metadata or {}
        encoded = stored.get(METADATA_KEY, b"{}")
        if DIGEST_KEY in stored and stored[DIGEST_KEY] != _digest(table, encoded):
            raise ValueError("its schema, row count or metadata does not match their checksum")
        return (table if arrow else table.to_pydict()), json.loads(encoded)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:  # bad JSON and bad UTF-8 are ValueErrors too
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise UserError(f"{path} is damaged ({reason}); {repair_hint(path)}") from None
