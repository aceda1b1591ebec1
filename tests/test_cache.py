"""Tests of the cache layer: HDF5 stores, the Parquet index and fingerprints."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from cache import store
from cache.fingerprint import file_stat, sha256_bytes, sha256_file, sha256_json, stable_int
from cache.index import METADATA_KEY, read_table, write_table

DATASETS = {
    "image_emb": ((5, 3, 8), np.float16),
    "view_params": ((5, 3, 14), np.float32),
    "status": ((5,), np.uint8),
    "labels": ((7,), np.int64),
}


def run_plain_python(code: str, cwd) -> str:
    """Run ``code`` in a fresh interpreter that imports no project module."""
    guard = textwrap.dedent("""
        import sys
        _project = ("pipeline", "stages", "data", "cache")
        def _check():
            loaded = [m for m in sys.modules if m.split(".")[0] in _project]
            assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code) + "\n_check()\n"],
                            cwd=cwd, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    return result.stdout


# ------------------------------------------------------------------------------ store

def test_create_write_read_round_trip(tmp_path):
    path = tmp_path / "teacher.h5"
    store.create(path, DATASETS, {"teacher": "demo"})
    assert store.shapes(path) == {name: (shape, np.dtype(dtype).name)
                                  for name, (shape, dtype) in DATASETS.items()}
    for name, (shape, dtype) in DATASETS.items():  # fresh datasets read as zeros
        fresh = store.read(path, name)
        assert fresh.shape == shape and fresh.dtype == dtype and not fresh.any()

    rng = np.random.default_rng(0)
    written = {
        "image_emb": rng.normal(size=(5, 3, 8)).astype(np.float16),
        "view_params": rng.uniform(0, 300, size=(5, 3, 14)).astype(np.float32),
        "status": np.array([1, 0, 2, 1, 1], np.uint8),
        "labels": np.array([3, -1, 2 ** 40, 0, 5, 6, 7], np.int64),
    }
    size_before = os.path.getsize(path)
    with h5py.File(path, "r+") as f:
        for name, values in written.items():
            f[name][...] = values
        f["status"][1] = store.DONE  # a single-row write, as extraction does
    written["status"][1] = store.DONE
    assert os.path.getsize(path) == size_before  # space was allocated up front
    for name, values in written.items():
        got = store.read(path, name)
        assert got.dtype == values.dtype
        assert np.array_equal(got, values), name
    assert (store.PENDING, store.DONE, store.FAILED) == (0, 1, 2)


def test_attrs_round_trip(tmp_path):
    path = tmp_path / "s.h5"
    attrs = {
        "teacher": "ViT-B-16",
        "views": 8,
        "big": 2 ** 40,
        "lr": 5e-5,
        "flag": True,
        "off": False,
        "templates": ["a photo of a {}.", "a drawing of a {}."],
        "augment": {"scale": [0.7, 1.0], "flip_p": 0.5, "nested": {"k": [1, {"z": None}]}},
        "preprocess": {"size": 224, "mean": [0.48, 0.45, 0.40], "interpolation": "bicubic"},
        "pair": (1, 2),
        "empty_list": [],
        "not_json": "[not json",
        "braces": "{oops",
        "empty": "",
    }
    store.create(path, {"x": ((2,), np.float32)}, attrs)
    got = store.read_attrs(path)
    expected = {**attrs, "pair": [1, 2], "format_version": store.FORMAT_VERSION}
    assert got == expected
    for key in ("views", "big", "format_version"):
        assert type(got[key]) is int, key
    assert type(got["lr"]) is float
    assert got["flag"] is True and got["off"] is False
    assert type(got["teacher"]) is str

    # the JSON-encoded attributes are plain "json:..." strings for any HDF5 reader
    with h5py.File(path, "r") as f:
        raw = f.attrs["templates"]
        raw = raw.decode() if isinstance(raw, bytes) else raw
        assert raw.startswith(store.JSON_PREFIX)
        assert json.loads(raw[len(store.JSON_PREFIX):]) == attrs["templates"]

    # write_attrs on an open file updates (and adds) attributes
    with h5py.File(path, "r+") as f:
        store.write_attrs(f, {"views": 4, "domains": ["a", "b"]})
    got = store.read_attrs(path)
    assert got["views"] == 4 and got["domains"] == ["a", "b"] and got["teacher"] == "ViT-B-16"


def test_none_attr_round_trips_as_none(tmp_path):
    """A top-level ``None`` attribute must read back as ``None``.

    extract.store_attrs spreads ``teacher.identity`` at the top level, and the demo teacher
    (and any ``--pretrained none`` teacher) has ``"pretrained": None``. If it reads back as the
    string "null", resuming an interrupted extraction compares "null" != None in
    extract.mismatches and refuses the cache ("different pretrained: cached null, now null").
    """
    path = tmp_path / "teacher.h5"
    attrs = {"teacher": "local-dir:/some/where", "pretrained": None, "views": 8}
    store.create(path, {"status": ((3,), np.uint8)}, attrs)
    got = store.read_attrs(path)
    assert got["pretrained"] is None, f"None came back as {got['pretrained']!r}"
    assert [k for k in attrs if got.get(k) != attrs[k]] == []


def test_create_is_atomic_and_preallocated(tmp_path):
    path = tmp_path / "teacher.h5"
    store.create(path, DATASETS, {"a": 1})
    assert path.exists()
    assert not (tmp_path / "teacher.h5.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.h5"]
    with h5py.File(path, "r") as f:
        for name, (shape, dtype) in DATASETS.items():
            ds = f[name]
            full = int(np.prod(shape)) * np.dtype(dtype).itemsize
            assert ds.id.get_storage_size() == full, name
            assert ds.chunks is None  # contiguous: one read per dataset

    # re-creating replaces the whole file: old datasets and attributes are gone
    store.create(path, {"features": ((4, 2), np.float16)}, {"b": [1]})
    assert store.shapes(path) == {"features": ((4, 2), "float16")}
    attrs = store.read_attrs(path)
    assert "a" not in attrs and attrs["b"] == [1]
    assert not (tmp_path / "teacher.h5.tmp").exists()


def test_failed_create_leaves_existing_store_untouched(tmp_path):
    path = tmp_path / "teacher.h5"
    store.create(path, {"status": ((3,), np.uint8)}, {"views": 8})
    with h5py.File(path, "r+") as f:
        f["status"][...] = [1, 2, 1]
    before = path.read_bytes()
    with pytest.raises(Exception):
        store.create(path, {"ok": ((2,), np.float32), "bad": ((2,), object)}, {"views": 9})
    assert path.read_bytes() == before
    assert store.read(path, "status").tolist() == [1, 2, 1]
    assert store.read_attrs(path)["views"] == 8


def test_identical_content_gives_identical_bytes(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    store.create(a, DATASETS, {"templates": ["x"], "views": 3})
    os.utime(tmp_path)  # time passes between the two
    store.create(b, DATASETS, {"templates": ["x"], "views": 3})
    assert a.read_bytes() == b.read_bytes()


def test_store_readable_with_plain_h5py_in_fresh_process(tmp_path):
    path = tmp_path / "teacher.h5"
    store.create(path, DATASETS, {"classes": ["cat", "dog"], "views": 3})
    emb = np.arange(5 * 3 * 8, dtype=np.float16).reshape(5, 3, 8)
    with h5py.File(path, "r+") as f:
        f["image_emb"][...] = emb
        f["status"][...] = [1, 1, 2, 0, 1]
    out = run_plain_python(f"""
        import json, h5py
        with h5py.File({str(path)!r}, "r") as f:
            emb = f["image_emb"][()]
            print(json.dumps({{
                "names": sorted(f.keys()),
                "shape": list(emb.shape), "dtype": str(emb.dtype), "sum": float(emb.astype("float64").sum()),
                "status": f["status"][()].tolist(),
                "classes": json.loads(f.attrs["classes"].removeprefix("json:")), "views": int(f.attrs["views"]),
                "format_version": int(f.attrs["format_version"]),
            }}))
    """, cwd=tmp_path)
    seen = json.loads(out)
    assert seen["names"] == sorted(DATASETS)
    assert seen["shape"] == [5, 3, 8] and seen["dtype"] == "float16"
    assert seen["sum"] == float(emb.astype(np.float64).sum())
    assert seen["status"] == [1, 1, 2, 0, 1]
    assert seen["classes"] == ["cat", "dog"] and seen["views"] == 3
    assert seen["format_version"] == store.FORMAT_VERSION


# ------------------------------------------------------------------------------ index

def _index_columns():
    return ({"path": ["a/x/1.png", "a/y/2.jpg", "b/x/3.png"],
             "domain": ["a", "a", "b"],
             "label": np.array([0, 1, 0], np.int32),
             "size": np.array([10, 2 ** 33, 30], np.int64),
             "split": ["train", "val", "train"],
             "status": ["ok", "cannot decode: x", "ok"]},
            {"root": "/data/pacs", "classes": ["x", "y"], "val_fraction": 0.2, "split_seed": 3})


def test_index_write_read_round_trip(tmp_path):
    path = tmp_path / "index.parquet"
    columns, metadata = _index_columns()
    write_table(path, columns, metadata)
    assert not (tmp_path / "index.parquet.tmp").exists()
    got_columns, got_metadata = read_table(path)
    assert got_metadata == metadata
    assert list(got_columns) == list(columns)
    for name, values in columns.items():
        assert got_columns[name] == list(np.asarray(values).tolist()), name
    # overwriting replaces the table
    write_table(path, {"path": ["z"]}, {"root": "/else"})
    assert read_table(path) == ({"path": ["z"]}, {"root": "/else"})


def test_index_without_metadata_reads_empty_metadata(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"path": ["a"]}), path)
    assert read_table(path) == ({"path": ["a"]}, {})


def test_index_readable_with_plain_pyarrow_in_fresh_process(tmp_path):
    path = tmp_path / "index.parquet"
    columns, metadata = _index_columns()
    write_table(path, columns, metadata)
    out = run_plain_python(f"""
        import json
        import pyarrow.parquet as pq
        table = pq.read_table({str(path)!r})
        print(json.dumps({{
            "rows": table.num_rows, "columns": table.column_names,
            "types": {{f.name: str(f.type) for f in table.schema}},
            "path": table.column("path").to_pylist(), "size": table.column("size").to_pylist(),
            "metadata": json.loads(table.schema.metadata[{METADATA_KEY!r}]),
        }}))
    """, cwd=tmp_path)
    seen = json.loads(out)
    assert seen["rows"] == 3
    assert seen["columns"] == list(columns)
    assert seen["types"]["label"] == "int32" and seen["types"]["size"] == "int64"
    assert seen["types"]["path"] in ("string", "large_string")
    assert seen["path"] == columns["path"] and seen["size"] == columns["size"].tolist()
    assert seen["metadata"] == metadata


# ------------------------------------------------------------------------ fingerprint

def test_sha256_json_independent_of_key_order():
    a = {"b": 1, "a": [1, 2, {"y": 2, "x": 1}], "c": {"q": None, "p": "s"}}
    b = {"c": {"p": "s", "q": None}, "a": [1, 2, {"x": 1, "y": 2}], "b": 1}
    assert sha256_json(a) == sha256_json(b)
    assert len(sha256_json(a)) == 64 and int(sha256_json(a), 16) >= 0
    # but values, list order and types matter
    assert sha256_json(a) != sha256_json({**a, "b": 2})
    assert sha256_json([1, 2]) != sha256_json([2, 1])
    assert sha256_json({"a": 1}) != sha256_json({"a": "1"})
    assert sha256_json({"a": 1}) != sha256_json({"a": 1, "b": None})


def test_sha256_bytes_and_file(tmp_path):
    data = bytes(range(256)) * 37 + b"tail"
    assert sha256_bytes(data) == hashlib.sha256(data).hexdigest()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    for chunk in (1, 7, 256, len(data), 1 << 22):  # chunking never changes the digest
        assert sha256_file(path, chunk_size=chunk) == sha256_bytes(data)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_stable_int_deterministic_and_distinct():
    values = [stable_int(f"domain/class/{i}.png") for i in range(2000)]
    assert values == [stable_int(f"domain/class/{i}.png") for i in range(2000)]
    assert len(set(values)) == len(values)
    assert all(type(v) is int and 0 <= v < 2 ** 63 for v in values)
    assert stable_int("a") != stable_int("b") and stable_int("") != stable_int(" ")
    assert stable_int("0:x.png") != stable_int("1:x.png")
    # spread over the whole range, not clustered (e.g. not a small checksum)
    assert max(values) > 2 ** 62 and min(values) < 2 ** 60


def test_stable_int_same_in_another_process(tmp_path):
    """Unlike hash(), the value does not change between interpreter runs."""
    strings = ["x", "photo/dog/001.jpg", "0:sketch/cat/é.png"]
    code = ("import json, sys; sys.path.insert(0, {root!r}); from cache.fingerprint import stable_int;"
            " print(json.dumps([stable_int(s) for s in {strings!r}]))").format(
        root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), strings=strings)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [stable_int(s) for s in strings]


def test_file_stat(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"12345")
    os.utime(path, ns=(1_000_000_000, 1_234_567_890_123_456_789))
    assert file_stat(path) == {"size": 5, "mtime_ns": 1_234_567_890_123_456_789}


def test_failed_writes_read_as_one_sentence_and_space_is_checked(tmp_path, monkeypatch):
    from cache import space
    from cache.errors import UserError

    hdf5 = OSError("Unable to synchronously write data (file write failed: time = Thu Dec  3 13:19:05 2026\n"
                   f", filename = '{tmp_path}/teacher.h5', file descriptor = 4, errno = 28, error message = "
                   "'No space left on device', buf = 0x55, total write size = 39936)")
    said = space.sentence(hdf5)
    assert said.startswith(f"No space left on device: {tmp_path}/teacher.h5 (") and "free on /" in said
    assert "\n" not in said and "buf =" not in said
    assert space.sentence(OSError(2, "No such file or directory", "x")) == "No such file or directory: x"
    assert space.sentence(OSError(22, "Invalid argument")) is None  # not the environment: a bug, raised
    with pytest.raises(UserError, match=r"pixels\.h5 needs .* free on /"):
        space.require(tmp_path, 10 ** 18, "pixels.h5")
    monkeypatch.setenv("PIPELINE_SKIP_SPACE_CHECK", "1")
    space.require(tmp_path, 10 ** 18, "pixels.h5")


def test_store_fingerprint_covers_attributes_and_checksums_not_the_arrays(tmp_path):
    """A manifest fingerprints an HDF5 store by its attributes and checksum tables: the same for
    the same content whatever the mtime, changed by a status or checksum write, and computed
    without reading the arrays (their damage is found where rows are read)."""
    from cache import manifest, student_features

    path = tmp_path / "features.h5"
    features = np.random.default_rng(0).standard_normal((3000, 2, 8)).astype(np.float16)
    blocks = student_features.prepare(path, 3000, 2, 8, {"student": "x"})
    with store.Rows(path) as rows:
        for block in blocks:
            student_features.write_block(rows, block, features[block.start:block.stop])
    first = manifest.content_hash(path)
    assert first.startswith("store-") and first != manifest.sha256_file(path)
    os.utime(path, ns=(0, 0))
    assert manifest.content_hash(path) == first
    # a rewritten block with its checksum: a different store
    with store.Rows(path) as rows:
        student_features.write_block(rows, blocks[0], features[:student_features.BLOCK] * 2)
    assert manifest.content_hash(path) not in (None, first)
    plain = tmp_path / "weights.bin"
    plain.write_bytes(b"abc")
    assert manifest.content_hash(plain) == manifest.sha256_file(plain)


def test_student_features_are_written_block_by_block_resumed_and_read_mapped(tmp_path):
    from cache import student_features
    path = tmp_path / "features.h5"
    features = np.random.default_rng(1).standard_normal((2500, 2, 4)).astype(np.float16)
    blocks = student_features.prepare(path, 2500, 2, 4, {"student": "x"})
    assert [len(b) for b in blocks] == [1024, 1024, 452]
    with store.Rows(path) as rows:  # a build killed after its first block
        student_features.write_block(rows, blocks[0], features[:1024])
    assert student_features.prepare(path, 2500, 2, 4, {"student": "x"}) == blocks[1:]  # resumed
    assert student_features.prepare(path, 2500, 2, 4, {"student": "y"}) == blocks  # another student: anew
    with store.Rows(path) as rows:
        for block in blocks:
            student_features.write_block(rows, block, features[block.start:block.stop])
    read = student_features.read(path)
    assert _mapping_of(read.data_ptr()) == str(path)  # the file mapped, not loaded into memory
    assert np.array_equal(read.numpy(), features)
    with h5py.File(path, "r") as h:
        offset = h["features"].id.get_offset() + 1500 * 2 * 4 * 2
    with open(path, "r+b") as f:  # damage in the second block: found, marked pending, refused
        f.seek(offset)
        f.write(b"\x7f\x7f")
    with pytest.raises(student_features.DamagedFeatures, match="1 blocks"):
        student_features.read(path)
    assert student_features.pending(path) == [blocks[1]]


def _mapping_of(address: int) -> str | None:
    """The file mapped at ``address`` in this process (``/proc/self/maps``), if any."""
    for line in open("/proc/self/maps"):
        parts = line.split()
        start, stop = (int(x, 16) for x in parts[0].split("-"))
        if start <= address < stop:
            return parts[5] if len(parts) > 5 else None
    return None
