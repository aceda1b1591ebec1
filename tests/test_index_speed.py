"""The image index at DomainNet scale: read column-wise (no Python work per row but the strings),
once per command, with the same contents and the same refusals as a row-by-row reading."""
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from cache.errors import UserError
from cache.index import read_table, write_table
from data.domainbed import ImageIndex, scan
from stages import runfolder
from stages.runfolder import RunFolder

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
                    "0000000c4944415408d763f8cfc0000003010100c9fe92ef0000000049454e44ae426082")


def make_tree(root: Path, n_domains=3, n_classes=40, per_class=3) -> None:
    """ROOT/<domain>/<class>/<image>; some classes missing in a domain, one nested folder, non-images."""
    for d in range(n_domains):
        for c in range(n_classes):
            if (c + d) % 7 == 0:
                continue
            folder = root / f"domain{d}" / f"class_{c:03d}"
            folder.mkdir(parents=True)
            for i in range(per_class + c % 2):
                (folder / f"img{i}.png").write_bytes(PNG)
    (root / "domain0" / "class_001" / "sub").mkdir()
    (root / "domain0" / "class_001" / "sub" / "deeper.PNG").write_bytes(PNG)
    (root / "domain1" / "class_002" / "notes.txt").write_text("not an image")
    (root / "domain1" / "class_002" / ".hidden.png").write_bytes(PNG)


def row_by_row(columns: dict, metadata: dict) -> dict:
    """The index as read one row at a time (the reference the column-wise reading must equal)."""
    domains = metadata["domains"]
    for path in columns["path"]:
        if PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
            raise UserError(f"index path '{path}' points outside the dataset root")
    return {"paths": columns["path"], "domain": np.array([domains.index(d) for d in columns["domain"]]),
            "label": np.array(columns["label"]), "split": np.array(columns["split"]),
            "size": np.array(columns["size"]), "mtime_ns": np.array(columns["mtime_ns"]),
            "status": columns.get("status")}


@pytest.fixture
def run(tmp_path):
    make_tree(tmp_path / "ds")
    index = scan(tmp_path / "ds", val_fraction=0.3, split_seed=2)
    index.status = ["ok" if i % 5 else "cannot decode: broken" for i in range(len(index))]
    run = RunFolder(tmp_path / "run")
    run.extract_dir.mkdir(parents=True)
    write_table(run.index_path, *index.to_columns())
    return run


def test_scan_labels_index_the_sorted_classes(tmp_path):
    make_tree(tmp_path / "ds")
    index = scan(tmp_path / "ds")
    parts = [p.split("/") for p in index.paths]
    assert index.label.tolist() == [index.classes.index(p[1]) for p in parts]
    assert index.domain.tolist() == [index.domains.index(p[0]) for p in parts]
    assert "domain0/class_001/sub/deeper.PNG" in index.paths
    assert not any(p.endswith((".txt", ".hidden.png")) for p in index.paths)


def test_loaded_index_equals_the_row_by_row_reading(run):
    expected = row_by_row(*read_table(run.index_path))
    index = run.load_index()
    for name, want in expected.items():
        got = getattr(index, name)
        assert type(got) is type(want), name
        if isinstance(want, np.ndarray):
            assert np.array_equal(got, want) and got.dtype.kind == want.dtype.kind, name
            assert got.flags.writeable, name  # torch.as_tensor(index.label) must not warn
        else:
            assert got == want, name
    assert index.label.dtype == index.domain.dtype == index.size.dtype == index.mtime_ns.dtype == np.int64
    assert index.split.dtype == expected["split"].dtype
    from_lists = ImageIndex.from_columns(*read_table(run.index_path))
    assert from_lists.fingerprint == index.fingerprint == read_table(run.index_path)[1]["fingerprint"]
    assert np.array_equal(index.rows(split="val"), from_lists.rows(split="val"))


def test_load_index_reads_once_until_the_file_is_rewritten(run, monkeypatch, tmp_path):
    reads = []
    real_read = runfolder.read_table
    monkeypatch.setattr(runfolder, "read_table", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    first, second = run.load_index(), run.load_index()
    assert len(reads) == 1
    assert first.paths is second.paths and first.label is second.label  # the same columns, not re-read
    first.status = None  # a caller reassigning an attribute does not change what later calls get
    assert run.load_index().status == second.status is not None

    columns, metadata = read_table(run.index_path)
    columns["status"] = ["ok"] * len(columns["path"])
    write_table(run.index_path, columns, metadata)  # replaced: a new file
    assert run.load_index().status == columns["status"] and len(reads) == 2
    assert run.load_index().status == columns["status"] and len(reads) == 2

    columns["status"][0] = "cannot decode: rewritten in place"
    write_table(tmp_path / "other.parquet", columns, metadata)
    shutil.copyfile(tmp_path / "other.parquet", run.index_path)  # same inode, other size and time
    assert run.load_index().status[0] == "cannot decode: rewritten in place" and len(reads) == 3

    run.index_path.unlink()
    with pytest.raises(UserError, match="no extracted cache"):
        run.load_index()


@pytest.mark.parametrize("path", ["/etc/passwd", "..", "../x.png", "a/../../x.png", "a/..", "a//../x", None])
def test_unsafe_index_paths_are_refused(run, path):
    columns, metadata = read_table(run.index_path)
    columns["path"][1] = path
    write_table(run.index_path, columns, metadata)
    with pytest.raises(UserError, match="outside the dataset root"):
        run.load_index()


@pytest.mark.parametrize("path", ["a/..b/x.png", "a/b../x.png", "...png", "a/.../x", "./a.png", "a\\..\\x"])
def test_paths_that_only_look_unsafe_are_read(run, path):
    columns, metadata = read_table(run.index_path)
    columns["path"][1] = path
    assert row_by_row(columns, metadata)["paths"][1] == path  # the row-by-row check accepts it too
    write_table(run.index_path, columns, metadata)
    assert run.load_index().paths[1] == path


def test_a_domain_missing_from_the_metadata_is_refused(run):
    columns, metadata = read_table(run.index_path)
    columns["domain"][0] = "elsewhere"
    write_table(run.index_path, columns, metadata)
    with pytest.raises(UserError, match="not trusted"):
        run.load_index()


# ---------------------------------------------------------------- fresh checks without a rescan

@pytest.fixture
def flat_data(dataset, tmp_path):
    """A private copy of the generated dataset (DomainBed-flat: domain/class/image)."""
    target = tmp_path / "data"
    shutil.copytree(dataset, target, copy_function=shutil.copy2)
    return target


def _extract(run, data, teacher_dir, *extra):
    from conftest import invoke
    return invoke("extract", "--data", data, "--run", run, "--teacher", f"local-dir:{teacher_dir}",
                  "--views", 2, "--workers", 0, "--batch-size", 16, *extra)


def test_a_fresh_extract_reads_the_index_instead_of_scanning(flat_data, teacher_dir, tmp_path, monkeypatch):
    from data import domainbed
    run = tmp_path / "run"
    assert _extract(run, flat_data, teacher_dir).exit_code == 0
    assert RunFolder(run).load_index().listing == domainbed.listing_fingerprint(flat_data)

    scans = []
    real = domainbed.scan
    monkeypatch.setattr(domainbed, "scan", lambda *a, **k: scans.append(a) or real(*a, **k))
    again = _extract(run, flat_data, teacher_dir)
    assert again.exit_code == 0 and "up to date" in again.output and scans == []
    assert _extract(run, flat_data, teacher_dir, "--rescan").exit_code == 0 and len(scans) == 1

    image = next(flat_data.glob("photo/circle/*.png"))
    shutil.copy(image, image.with_name("added.png"))  # a new image changes its class folder
    added = _extract(run, flat_data, teacher_dir)
    assert added.exit_code == 2 and "1 images added" in added.output and len(scans) == 2


def test_an_image_rewritten_in_place_is_found_by_rescan(flat_data, teacher_dir, tmp_path):
    run = tmp_path / "run"
    assert _extract(run, flat_data, teacher_dir).exit_code == 0
    image = next(flat_data.glob("sketch/star/*.png"))
    folder = image.parent.stat()
    image.write_bytes(image.read_bytes())  # same name, new mtime: the folder's entries are unchanged
    assert image.parent.stat().st_mtime_ns == folder.st_mtime_ns
    assert "up to date" in _extract(run, flat_data, teacher_dir).output  # the documented blind spot
    rescanned = _extract(run, flat_data, teacher_dir, "--rescan")
    assert rescanned.exit_code == 2 and "1 modified" in rescanned.output


def test_a_tree_with_images_below_the_class_folders_is_always_scanned(tmp_path):
    make_tree(tmp_path / "tree")  # it has one nested folder
    assert scan(tmp_path / "tree").listing is None
    shutil.rmtree(tmp_path / "tree" / "domain0" / "class_001" / "sub")
    assert scan(tmp_path / "tree").listing is not None
