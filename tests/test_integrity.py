"""Nothing lost, part two: full disks, damaged caches, non-finite numbers, bookkeeping, symlink loops."""
import errno
import json
import os

import h5py
import numpy as np
import pytest

from cache import store, student_features
from conftest import ALIGN, DISTILL, invoke
from test_robustness import cache_contents, reference  # noqa: F401  (the undisturbed extraction)


def extract_args(dataset, run, teacher_dir):
    return ("extract", "--data", dataset, "--run", run, "--teacher", f"local-dir:{teacher_dir}", "--views", 3,
            "--workers", 0, "--batch-size", 2)


def _fail_on(monkeypatch, target, name, nth, action):
    """Make the ``nth`` call of ``target.name`` (a store or h5py method) fail or lie."""
    real, calls = getattr(target, name), {"n": 0}

    def patched(self, *args):
        calls["n"] += 1
        return action(real, self, *args) if calls["n"] == nth else real(self, *args)

    monkeypatch.setattr(target, name, patched)


def enospc(real, self, *args):
    raise OSError(errno.ENOSPC, "No space left on device", "teacher.h5")


def lost_write(real, self, name, start, array):  # the write "succeeds" but zeros reach the disk
    return real(self, name, start, np.zeros_like(array))


# each block is four row writes: embeddings, view parameters, checksum, then status
@pytest.mark.parametrize("name, nth, action", [
    ("write", 9, enospc),        # a block's rows
    ("write", 12, enospc),       # a status write
    ("write", 13, lost_write),   # silently lost rows: found by the read-back
])
def test_full_disk_during_extraction_resumes_to_identical_cache(name, nth, action, tmp_path, teacher_dir, dataset,
                                                                 reference, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _fail_on(patch, store.Rows, name, nth, action)
        result = invoke(*extract_args(dataset, run, teacher_dir))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    result = invoke(*extract_args(dataset, run, teacher_dir))
    assert result.exit_code == 0 and "resuming" in result.output, result.output
    assert cache_contents(run) == reference


def test_failed_flush_surfaces(tmp_path, teacher_dir, dataset, reference, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _fail_on(patch, store.Rows, "sync", 6, enospc)
        result = invoke(*extract_args(dataset, run, teacher_dir))
    assert result.exit_code == 2 and "No space left" in result.output
    assert invoke(*extract_args(dataset, run, teacher_dir)).exit_code == 0
    assert cache_contents(run) == reference


def test_full_disk_writing_student_features_then_same_command_completes(run_copy, tmp_path, monkeypatch):
    args = ("align", "--run", run_copy, "--holdout", "photo", *ALIGN)
    with monkeypatch.context() as patch:  # the block's checksum meets a full disk: the block stays pending
        _fail_on(patch, store.Rows, "write", 2, enospc)
        result = invoke(*args)
    assert result.exit_code == 2 and "No space left" in result.output
    features = next((run_copy / "features").glob("*/features.h5"))
    assert student_features.pending(features) == [range(0, 80)]
    assert invoke(*args).exit_code == 0
    assert student_features.pending(features) == []
    with h5py.File(features) as f:
        assert np.isfinite(f["features"][()].astype(np.float32)).all() and f["features"][()].any()


def _damage(path, dataset="image_emb", offset=0):
    with h5py.File(path, "r") as f:
        where = f[dataset].id.get_offset()
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(where + offset)
        f.write(b"\x7f" * 16)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its size and mtime kept


def test_damaged_teacher_cache_is_named_and_only_damaged_blocks_are_recomputed(run_copy, teacher_dir, dataset):
    assert invoke("align", "--run", run_copy, "--holdout", "photo", *ALIGN).exit_code == 0
    manifests = {p: p.read_bytes() for p in run_copy.rglob("manifest.json")}
    store = run_copy / "extract" / "teacher.h5"
    before = cache_contents(run_copy)
    _damage(store)
    for command in (("align", "--run", run_copy, "--holdout", "photo", *ALIGN, "--lr", "1e-3"),
                    ("distill", "--run", run_copy, "--holdout", "photo", *DISTILL),
                    ("evaluate", "--run", run_copy, "--method", "zeroshot", "--holdout", "photo")):
        result = invoke(*command)
        assert result.exit_code == 2 and "teacher.h5 is damaged" in result.output, result.output
        assert "pipeline extract" in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in run_copy.rglob("manifest.json")} == manifests
    result = invoke("extract", "--data", dataset, "--run", run_copy, "--teacher", f"local-dir:{teacher_dir}",
                    "--views", 3, "--workers", 0, "--batch-size", 16)
    assert result.exit_code == 0 and "1 blocks" in result.output, result.output
    assert cache_contents(run_copy) == before
    assert json.loads((run_copy / "extract" / "manifest.json").read_text())["summary"]["extracted_now"] == 16
    assert "up to date" in invoke("align", "--run", run_copy, "--holdout", "photo", *ALIGN).output


def test_damaged_text_embeddings_are_named_and_rewritten(run_copy, teacher_dir, dataset):
    store_path = run_copy / "extract" / "teacher.h5"
    before = {name: h5py.File(store_path)[name][()] for name in ("text_emb", "anchor_emb", "rise_text_emb")}
    _damage(store_path, "anchor_emb")
    result = invoke("evaluate", "--run", run_copy, "--method", "zeroshot", "--holdout", "photo")
    assert result.exit_code == 2 and "anchor_emb" in result.output and "pipeline extract" in result.output
    result = invoke("extract", "--data", dataset, "--run", run_copy, "--teacher", f"local-dir:{teacher_dir}",
                    "--views", 3, "--workers", 0, "--batch-size", 16)
    assert result.exit_code == 0 and "were damaged" in result.output, result.output
    with h5py.File(store_path) as f:
        assert all(np.array_equal(f[name][()], value) for name, value in before.items())


def test_damaged_features_blocks_are_recomputed_alone(run_copy):
    args = ("align", "--run", run_copy, "--holdout", "photo", *ALIGN)
    assert invoke(*args).exit_code == 0
    features = next((run_copy / "features").glob("*/features.h5"))
    before = features.read_bytes()
    _damage(features, "features", offset=100)
    assert "up to date" in invoke(*args).output  # not read: rows are checked where they are read
    result = invoke(*args, "--lr", "1e-3")  # reads them: the damaged block is found and recomputed
    assert result.exit_code == 0 and "1 blocks of rows do not match" in result.output, result.output
    assert features.read_bytes() == before
    assert "up to date" in invoke(*args, "--lr", "1e-3").output


def _damage_every_row(path, dataset="pixels"):
    """Flip bytes in view 0 of every row (the view validation reads), size and mtime kept."""
    with h5py.File(path, "r") as f:
        where, shape = f[dataset].id.get_offset(), f[dataset].shape
    row = int(np.prod(shape[1:]))
    stat = os.stat(path)
    with open(path, "r+b") as f:
        for r in range(shape[0]):
            f.seek(where + r * row + 7)
            f.write(b"\x01\x02\x03")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_pixel_cache_is_found_and_rendered_again(damage, run_copy):
    args = ("distill", "--run", run_copy, "--holdout", "photo", "--method", "erm", "--student", "test_resnet",
            "--student-weights", "none", "--student-size", 32, *DISTILL)
    assert invoke(*args).exit_code == 0
    pixels = next((run_copy / "pixels").glob("*/pixels.h5"))
    weights = next((run_copy / "distill").glob("erm/*/photo/seed0/best.safetensors"))
    before, trained = pixels.read_bytes(), weights.read_bytes()
    if damage == "flipped":
        _damage_every_row(pixels)
        result = invoke(*args, "--force")
        assert result.exit_code == 2 and "do not match their checksums" in result.output, result.output
        assert "run the same command again" in result.output and "Traceback" not in result.output
    else:
        pixels.write_bytes(before[:len(before) // 2])
    result = invoke(*args, "--force")
    assert result.exit_code == 0, result.output
    assert pixels.read_bytes() == before and weights.read_bytes() == trained


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_teacher_cache_is_one_line_everywhere(damage, run_copy, teacher_dir, dataset):
    assert invoke("align", "--run", run_copy, "--holdout", "photo", *ALIGN).exit_code == 0
    manifests = {p: p.read_bytes() for p in run_copy.rglob("manifest.json")}
    store = run_copy / "extract" / "teacher.h5"
    data = store.read_bytes()
    store.write_bytes(data[:len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    for command in (("align", "--run", run_copy, "--holdout", "photo", *ALIGN),
                    ("distill", "--run", run_copy, "--holdout", "photo", *DISTILL),
                    ("evaluate", "--run", run_copy, "--method", "zeroshot", "--holdout", "photo"),
                    ("info", "--run", run_copy)):
        result = invoke(*command)
        assert "Traceback" not in result.output and "OSError" not in result.output, result.output
        assert command[0] == "info" or (result.exit_code == 2 and "teacher.h5" in result.output), result.output
    assert {p: p.read_bytes() for p in run_copy.rglob("manifest.json")} == manifests
    result = invoke("extract", "--data", dataset, "--run", run_copy, "--teacher", f"local-dir:{teacher_dir}",
                    "--views", 3, "--workers", 0, "--batch-size", 16)
    assert result.exit_code == 0 and "rebuilding" in result.output, result.output
    assert "up to date" in invoke("align", "--run", run_copy, "--holdout", "photo", *ALIGN).output


def test_symlink_loops_make_no_fake_domains_or_duplicates(tmp_path):
    from PIL import Image
    from data import domainbed
    for domain in ("photo", "sketch"):
        (tmp_path / domain / "circle").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / domain / "circle" / "a.png")
    (tmp_path / "x").symlink_to(".")                         # a loop at domain level
    (tmp_path / "photo" / "loop").symlink_to("..")           # and at class level
    (tmp_path / "sketch" / "circle" / "again").symlink_to(".")  # and inside a class
    index = domainbed.scan(tmp_path)
    assert index.domains == ["photo", "sketch"] and index.classes == ["circle"]
    assert sorted(index.paths) == ["photo/circle/a.png", "sketch/circle/a.png"]


def test_non_finite_options_are_refused_and_finished_work_kept(run_copy):
    assert invoke("align", "--run", run_copy, "--holdout", "photo", *ALIGN).exit_code == 0
    manifests = {p: p.read_bytes() for p in run_copy.rglob("manifest.json")}
    for command in (("align", "--run", run_copy, "--holdout", "photo", *ALIGN, "--lr", "nan"),
                    ("align", "--run", run_copy, "--holdout", "photo", *ALIGN, "--lam", "inf"),
                    ("distill", "--run", run_copy, "--holdout", "photo", *DISTILL, "--lr", "nan"),
                    ("distill", "--run", run_copy, "--holdout", "photo", "--method", "probe", *DISTILL,
                     "--lr", "inf"),
                    ("distill", "--run", run_copy, "--holdout", "photo", *DISTILL, "--cutmix", "nan")):
        result = invoke(*command)
        assert result.exit_code == 2 and ("finite" in result.output or "cutmix" in result.output), result.output
    assert {p: p.read_bytes() for p in run_copy.rglob("manifest.json")} == manifests


def test_diverging_loss_stops_and_keeps_the_finished_record(run_copy):
    args = ("distill", "--run", run_copy, "--holdout", "photo", "--method", "erm", "--student", "test_resnet",
            "--student-weights", "none", "--student-size", 32, "--steps", 4, "--per-domain", 2, "--eval-every", 2,
            "--workers", 0)
    assert invoke(*args).exit_code == 0
    folder = next((run_copy / "distill" / "erm").glob("*/photo/seed0"))
    recorded = (folder / "manifest.json").read_bytes()
    result = invoke(*args, "--lr", "1e30", "--force")
    assert result.exit_code == 2 and "loss became" in result.output, result.output
    assert (folder / "manifest.json").read_bytes() == recorded
    assert "up to date" in invoke(*args).output


def test_unreadable_manifest_is_stale_and_force_works(run_copy, teacher_dir, dataset):
    args = ("extract", "--data", dataset, "--run", run_copy, "--teacher", f"local-dir:{teacher_dir}", "--views", 3,
            "--workers", 0, "--batch-size", 16)
    (run_copy / "extract" / "manifest.json").write_text("")
    assert "up to date" not in invoke(*args).output
    (run_copy / "extract" / "manifest.json").write_text("{not json")
    assert invoke(*args, "--force").exit_code == 0
    assert "up to date" in invoke(*args).output


def test_results_rows_are_repaired_and_restored(run_copy):
    args = ("evaluate", "--run", run_copy, "--method", "zeroshot", "--holdout", "photo")
    assert invoke(*args).exit_code == 0
    results = run_copy / "results.jsonl"
    row = results.read_text()
    results.write_text(row[:-20])  # a torn last line, and the evaluation's row lost with it
    assert invoke(*args).exit_code == 0  # fresh: the row comes back from metrics.json
    assert results.read_text() == row
    assert invoke(*args, "--force").exit_code == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]  # strict JSON throughout
    assert len(rows) == 2


def test_full_disk_saving_a_distill_checkpoint_then_same_command_gives_same_weights(run_copy, monkeypatch):
    import torch
    from safetensors.torch import load_file
    args = ("distill", "--run", run_copy, "--method", "erm", "--holdout", "sketch", "--student", "test_resnet",
            "--student-weights", "none", "--student-size", 32, "--steps", 6, "--per-domain", 2,
            "--eval-every", 2, "--workers", 0)
    assert invoke(*args).exit_code == 0
    out = next((run_copy / "distill" / "erm").glob("*/sketch/seed0"))
    undisturbed = load_file(out / "best.safetensors")
    with monkeypatch.context() as patch:
        _fail_on(patch, torch.serialization, "save", 2, lambda real, *a: enospc(real, None))
        patch.setattr(torch, "save", torch.serialization.save)
        result = invoke(*args, "--force")
    assert result.exit_code == 2 and "No space left" in result.output, result.output
    assert invoke(*args).exit_code == 0
    resumed = load_file(out / "best.safetensors")
    assert all(torch.equal(resumed[k], undisturbed[k]) for k in undisturbed)


def test_info_reads_while_an_extraction_holds_the_cache(run_copy):
    import subprocess
    import sys
    writer = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('open', flush=True); time.sleep(60)", str(run_copy / "extract" / "teacher.h5")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        result = invoke("info", "--run", run_copy)
        assert result.exit_code == 0 and "teacher:" in result.output, result.output
    finally:
        writer.kill()
        writer.wait()
