"""Content fingerprints: what a stage's manifest records about its inputs and outputs."""
import hashlib
import json
from pathlib import Path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj) -> str:
    """Fingerprint of a JSON-able object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def sha256_file(path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def stable_int(text: str) -> int:
    """A 63-bit integer from a string, the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little") >> 1


def file_stat(path) -> dict:
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
