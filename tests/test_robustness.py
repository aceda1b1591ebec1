"""Nothing lost, clear errors: kills, interrupts, bad images, mismatched caches, locks."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from cache.index import read_table
from conftest import invoke, write_tiny_teacher

DATASETS = ("image_emb", "view_params", "status", "text_emb", "classifier", "rise_text_emb",
            "rise_classifier", "anchor_emb")


def extract_command(data, run, teacher_dir, *extra):
    return [sys.executable, "-m", "pipeline", "extract", "--data", str(data), "--run", str(run),
            "--teacher", f"local-dir:{teacher_dir}", "--views", "3", "--workers", "0",
            "--batch-size", "2", *extra]


def cache_contents(run) -> dict:
    with h5py.File(run / "extract" / "teacher.h5", "r") as f:
        contents = {name: f[name][()].tobytes() for name in DATASETS}
    contents["index"] = read_table(run / "extract" / "index.parquet")
    return contents


def wait_for(path, process, limit=120.0):
    deadline = time.time() + limit
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "extraction did not start"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, dataset):
    run = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(extract_command(dataset, run, teacher_dir), check=True, capture_output=True)
    return cache_contents(run)


def test_sigkill_at_random_moments_then_resume_gives_identical_cache(tmp_path, teacher_dir, dataset, reference):
    run = tmp_path / "run"
    store = run / "extract" / "teacher.h5"
    rng = random.Random(7)
    kills = 0
    for _ in range(3):  # bounded: three kills, each within two seconds of the cache appearing
        process = subprocess.Popen(extract_command(dataset, run, teacher_dir), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        wait_for(store, process)
        time.sleep(rng.uniform(0.0, 0.6))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate()
    assert kills >= 1
    with h5py.File(store, "r") as f:  # a killed run leaves a readable, partial cache
        assert f["status"].shape == (80,)
    result = subprocess.run(extract_command(dataset, run, teacher_dir), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert cache_contents(run) == reference


def test_sigint_stops_cleanly_and_resumes(tmp_path, teacher_dir, dataset, reference):
    run = tmp_path / "run"
    process = subprocess.Popen(extract_command(dataset, run, teacher_dir), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(run / "extract" / "teacher.h5", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("extraction finished before the interrupt arrived")
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr
    result = subprocess.run(extract_command(dataset, run, teacher_dir), capture_output=True, text=True)
    assert result.returncode == 0 and "resuming" in result.stderr
    assert cache_contents(run) == reference


def _bad_dataset(root):
    good = Image.new("RGB", (40, 30), (200, 30, 30))
    folder = root / "photo" / "circle"
    folder.mkdir(parents=True)
    good.save(folder / "good.png")
    (folder / "empty.jpg").write_bytes(b"")
    full = root / "full.png"
    good.save(full)
    (folder / "truncated.png").write_bytes(full.read_bytes()[:60])
    full.unlink()
    jpeg = folder / "truncated.jpg"
    good.save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    (folder / "text.png").write_text("not an image at all")
    good.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(folder / "sixteen.png")
    good.convert("P").save(folder / "palette.png")
    Image.new("RGBA", (40, 30), (0, 0, 255, 128)).save(folder / "alpha.png")
    good.convert("L").save(folder / "gray.png")
    bomb = folder / "bomb.png"
    Image.new("1", (17_000, 17_000)).save(bomb)
    (folder / "locked.png").write_bytes((folder / "good.png").read_bytes())
    other = root / "sketch" / "circle"
    other.mkdir(parents=True)
    good.save(other / "fine.png")


def test_bad_images_are_recorded_and_skipped(tmp_path, teacher_dir, monkeypatch):
    data, run = tmp_path / "data", tmp_path / "run"
    _bad_dataset(data)
    real_open = Image.open

    def unreadable(path, *args, **kwargs):  # tests run as root, where chmod 000 still reads
        if str(path).endswith("locked.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", unreadable)
    result = invoke("extract", "--data", data, "--run", run, "--teacher", f"local-dir:{teacher_dir}",
                    "--views", 2, "--workers", 0)
    assert result.exit_code == 0, result.output
    columns, _ = read_table(run / "extract" / "index.parquet")
    status = dict(zip((p.split("/")[-1] for p in columns["path"]), columns["status"]))
    for converted in ("good.png", "cmyk.jpg", "sixteen.png", "palette.png", "alpha.png", "gray.png", "fine.png"):
        assert status[converted] == "ok", (converted, status[converted])
    expected = {"empty.jpg": "cannot decode", "truncated.png": "cannot decode", "truncated.jpg": "cannot decode",
                "text.png": "cannot decode", "bomb.png": "too large", "locked.png": "cannot read"}
    for name, reason in expected.items():
        assert status[name].startswith(reason), (name, status[name])
    assert f"skipped {len(expected)} unreadable images" in result.output
    assert "skipped.jsonl" in result.output
    skipped = [json.loads(line) for line in (run / "extract" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["path"].split("/")[-1] for s in skipped) == sorted(expected)


def test_decode_time_limit(tmp_path, monkeypatch):
    from data import images
    path = tmp_path / "slow.png"
    Image.new("RGB", (8, 8)).save(path)
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: (time.sleep(5), real_open(*a, **k))[1])
    started = time.time()
    with pytest.raises(images.BadImage, match="longer than 0.2 s"):
        images.load_image(path, timeout=0.2)
    assert time.time() - started < 2


@pytest.mark.parametrize("change, differs", [
    (("--views", "2"), "views"),
    (("--view-seed", "5"), "view_seed"),
    (("--templates", "rise7"), "templates"),
])
def test_mismatched_settings_are_refused(change, differs, run_copy, teacher_dir, dataset):
    command = ["extract", "--data", dataset, "--run", run_copy, "--teacher", f"local-dir:{teacher_dir}",
               "--views", 3, "--workers", 0]
    position = command.index(change[0]) + 1 if change[0] in command else None
    if position:
        command[position] = change[1]
    else:
        command += list(change)
    result = invoke(*command)
    assert result.exit_code == 2, result.output
    assert f"different {differs}" in result.output and "--force" in result.output


def test_changed_checkpoint_is_refused(run_copy, dataset, tmp_path):
    teacher = write_tiny_teacher(tmp_path / "moved" / "tiny", seed=3)  # the cached teacher's name, other weights
    result = invoke("extract", "--data", dataset, "--run", run_copy, "--teacher", f"local-dir:{teacher}",
                    "--views", 3, "--workers", 0)
    assert result.exit_code == 2 and "checkpoint_sha256" in result.output and "--force" in result.output
    assert not (run_copy / "extract" / "teachers").exists()


def test_changed_dataset_says_what_changed(run_copy, teacher_dir, dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data, copy_function=shutil.copy2)
    next(data.glob("photo/circle/*.png")).unlink()
    Image.new("RGB", (70, 70)).save(data / "photo" / "circle" / "new.png")
    os.utime(next(data.glob("sketch/star/*.png")), ns=(1, 1))
    result = invoke("extract", "--data", data, "--run", run_copy, "--teacher", f"local-dir:{teacher_dir}",
                    "--views", 3, "--workers", 0)
    assert result.exit_code == 2
    assert "1 images added, 1 removed, 1 modified" in result.output


def test_a_second_writer_of_the_same_stage_waits_then_skips(run_copy, teacher_dir, dataset):
    import fcntl
    import threading
    import time
    lock = open(run_copy / "extract" / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process is writing the extraction
    release = threading.Timer(1.5, lambda: (fcntl.flock(lock, fcntl.LOCK_UN), lock.close()))
    (run_copy / "extract" / "manifest.json").unlink()  # so the second writer has something to do
    started = time.time()
    release.start()
    result = invoke("extract", "--data", dataset, "--run", run_copy, "--teacher", f"local-dir:{teacher_dir}",
                    "--views", 3, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "waiting for another pipeline process writing" in result.output
    assert time.time() - started >= 1.4
    assert "up to date" in invoke("extract", "--data", dataset, "--run", run_copy, "--teacher",
                                  f"local-dir:{teacher_dir}", "--views", 3, "--workers", 0).output


def test_unwritable_run_folder(tmp_path, dataset, teacher_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("extract", "--data", dataset, "--run", blocker / "run", "--teacher", f"local-dir:{teacher_dir}")
    assert result.exit_code == 2 and "cannot write to run folder" in result.output


def test_full_disk_is_one_line_and_keeps_the_cache(run_copy, monkeypatch):
    import stages.stage

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "projection.safetensors")

    monkeypatch.setattr(stages.stage, "save", full)
    before = (run_copy / "extract" / "teacher.h5").read_bytes()
    result = invoke("align", "--run", run_copy, "--holdout", "photo", "--student", "test_resnet",
                    "--student-weights", "none", "--student-size", 32, "--steps", 4, "--workers", 0)
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert "Traceback" not in result.output
    assert (run_copy / "extract" / "teacher.h5").read_bytes() == before


def test_index_paths_cannot_escape_the_root(run_copy):
    from cache.index import write_table
    columns, metadata = read_table(run_copy / "extract" / "index.parquet")
    columns["path"][0] = "../../etc/passwd"
    write_table(run_copy / "extract" / "index.parquet", columns, metadata)
    result = invoke("evaluate", "--run", run_copy, "--method", "zeroshot", "--holdout", "photo")
    assert result.exit_code == 2 and "outside the dataset root" in result.output


def test_killed_distill_resumes_to_the_same_weights(run_copy, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from stages import methods

    args = ("distill", "--run", run_copy, "--method", "erm", "--holdout", "sketch", "--student", "test_resnet",
            "--student-weights", "none", "--student-size", 32, "--steps", 6, "--per-domain", 2,
            "--eval-every", 2, "--workers", 0)
    out = run_copy / "distill" / "erm" / "test_resnet_none_32px" / "sketch" / "seed0"
    assert invoke(*args).exit_code == 0
    reference = load_file(out / "best.safetensors")
    log = (out / "log.jsonl").read_text()

    calls = {"n": 0}
    real_update = methods.Method.update

    def dies_at_step_5(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("killed")
        return real_update(self, batch)

    monkeypatch.setattr(methods.Method, "update", dies_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        invoke(*args, "--force")
    assert (out / "resume.pt").exists()
    monkeypatch.setattr(methods.Method, "update", real_update)
    calls["n"] = 0
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    resumed = load_file(out / "best.safetensors")
    assert resumed.keys() == reference.keys() and all(np.array_equal(resumed[k], reference[k]) for k in reference)
    def without_times(text):
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in text.splitlines()]

    assert without_times((out / "log.jsonl").read_text()) == without_times(log)
    assert not (out / "resume.pt").exists()


def test_options_out_of_range_are_usage_errors(run_copy):
    for args in (("--workers", "-1"), ("--batch-size", "0"), ("--student-size", "-5")):
        result = invoke("align", "--run", run_copy, "--holdout", "photo", "--student", "test_resnet",
                        "--student-weights", "none", *args)
        assert result.exit_code == 2 and "Traceback" not in result.output, (args, result.output)
    result = invoke("distill", "--run", run_copy, "--holdout", "photo", "--method", "erm", "--student", "test_resnet",
                    "--student-weights", "none", "--lr", "-1")
    assert result.exit_code == 2 and "--lr must be non-negative" in result.output


def test_no_source_validation_images_is_a_clear_error(tmp_path, teacher_dir, dataset):
    run = tmp_path / "run"
    assert invoke("extract", "--data", dataset, "--run", run, "--teacher", f"local-dir:{teacher_dir}",
                  "--views", 2, "--workers", 0, "--val-fraction", 0).exit_code == 0
    result = invoke("align", "--run", run, "--holdout", "photo", "--student", "test_resnet",
                    "--student-weights", "none", "--student-size", 32, "--steps", 2, "--workers", 0)
    assert result.exit_code == 2 and "no validation images" in result.output


def test_image_removed_after_extraction_is_a_clear_error(run_copy, tmp_path):
    from cache.index import write_table
    columns, metadata = read_table(run_copy / "extract" / "index.parquet")
    data = tmp_path / "data"
    shutil.copytree(metadata["root"], data)
    (data / columns["path"][0]).unlink()
    write_table(run_copy / "extract" / "index.parquet", columns, {**metadata, "root": str(data)})
    result = invoke("align", "--run", run_copy, "--holdout", "photo", "--student", "test_resnet",
                    "--student-weights", "none", "--student-size", 32, "--steps", 2, "--workers", 0)
    assert result.exit_code == 2 and "dataset changed since extraction" in result.output
    assert "Traceback" not in result.output


def test_teacher_weights_changed_in_place_are_noticed(tmp_path, dataset):
    teacher = write_tiny_teacher(tmp_path / "t", seed=4)
    command = ("extract", "--data", dataset, "--run", tmp_path / "run", "--teacher", f"local-dir:{teacher}",
               "--views", 2, "--workers", 0)
    assert invoke(*command).exit_code == 0
    shutil.rmtree(teacher)
    write_tiny_teacher(teacher, seed=5)  # new weights, same folder
    result = invoke(*command)
    assert "up to date" not in result.output
    assert result.exit_code == 2 and "different checkpoint_sha256" in result.output


def test_unusable_weights_files_are_named(run_copy, teacher_dir, dataset, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(os.urandom(3000))
    teacher = invoke("extract", "--data", dataset, "--run", tmp_path / "r", "--teacher", "RN50", "--pretrained", text)
    assert teacher.exit_code == 2 and "is not a checkpoint for this model" in teacher.output
    student = invoke("align", "--run", run_copy, "--holdout", "photo", "--student", "test_resnet",
                     "--student-weights", noise, "--steps", 2, "--workers", 0)
    assert student.exit_code == 2 and "not a weights file" in student.output
    local = invoke("extract", "--data", dataset, "--run", tmp_path / "r2", "--teacher", f"local-dir:{teacher_dir}",
                   "--pretrained", "openai")
    assert local.exit_code == 2 and "does not apply to a local-dir" in local.output
