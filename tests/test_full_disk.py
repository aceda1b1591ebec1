"""A real full disk: each stage run on a small tmpfs filled to a few kilobytes free, then re-run
once the space is back. Every case ends in one line and exit code 2 (or succeeds when it fits),
never a traceback or a crash, and the re-run's outputs are byte-identical to an undisturbed run.

Each case runs twice: with the free-space check (refused before any work, so nothing is written)
and with it skipped (``PIPELINE_SKIP_SPACE_CHECK=1``), so that the writes themselves meet the
full disk mid-way.
"""
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import invoke

FREE_KB = (0, 4, 8, 16, 24, 40, 100, 1024)
ALIGN = ("--student", "test_resnet", "--student-weights", "none", "--student-size", 32, "--steps", 20,
         "--per-domain", 4, "--eval-every", 10, "--workers", 0)
DISTILL = ("distill", "--holdout", "photo", "--steps", 3, "--per-domain", 2, "--eval-every", 1, "--workers", 0)

# stage -> (folders of the reference run it starts from, its command, the folders it writes)
STAGES = {
    "extract": ((), ("extract", "--views", 3, "--workers", 0, "--batch-size", 16), ("extract",)),
    "features": (("extract",), ("align", "--holdout", "photo", *ALIGN), ("features", "align")),
    "pixels": (("extract", "features", "align"), DISTILL, ("pixels", "distill")),
    "distill": (("extract", "features", "align", "pixels"), DISTILL, ("distill",)),
    "resume": (("extract", "features", "align", "pixels", "interrupted"), DISTILL, ("distill",)),
    "evaluate": (("extract", "features", "align", "pixels", "distill"),
                 ("evaluate", "--method", "adip", "--holdout", "photo"), ("evaluate",)),
}


def command(stage, run, dataset, teacher_dir):
    name, *rest = STAGES[stage][1]
    extra = ("--data", dataset, "--teacher", f"local-dir:{teacher_dir}") if name == "extract" else ()
    return (name, "--run", run, *extra, *rest)


def outputs(run, folders) -> dict:
    """sha256 of every output file (manifests, locks and logs hold times; metrics.json too)."""
    found = {}
    for folder in folders:
        for path in sorted((run / folder).rglob("*")):
            if not path.is_file() or path.name in ("manifest.json", ".lock", "log.jsonl"):
                continue
            data = path.read_bytes()
            if path.name == "metrics.json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "time"}).encode()
            found[path.relative_to(run).as_posix()] = hashlib.sha256(data).hexdigest()
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset, teacher_dir):
    """An undisturbed run of every stage, and a distill interrupted after its second step."""
    from stages import methods

    run = tmp_path_factory.mktemp("full-disk-reference") / "run"
    for stage in ("extract", "features", "pixels", "evaluate"):
        result = invoke(*command(stage, run, dataset, teacher_dir))
        assert result.exit_code == 0, result.output
    interrupted = tmp_path_factory.mktemp("interrupted") / "run"
    shutil.copytree(run, interrupted, copy_function=shutil.copy2, ignore=shutil.ignore_patterns("distill", "evaluate"))
    real_update, calls = methods.Method.update, {"n": 0}

    def dies_at_step_3(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real_update(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(methods.Method, "update", dies_at_step_3)
        with pytest.raises(RuntimeError, match="killed"):
            invoke(*command("distill", interrupted, dataset, teacher_dir))
    assert list(interrupted.glob("distill/**/resume.pt"))
    shutil.copytree(interrupted / "distill", run / "interrupted")
    return run


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount, free_kb: int) -> None:
    stat = os.statvfs(mount)
    with open(mount / "filler", "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free_kb * 1024))


@pytest.mark.parametrize("checked", [True, False], ids=["space-checked", "writes-fail"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_full_disk_is_one_line_and_the_rerun_is_identical(stage, checked, small_disk, reference, dataset,
                                                          teacher_dir, monkeypatch):
    before, _, written = STAGES[stage]
    expected = outputs(reference, written)
    if not checked:
        monkeypatch.setenv("PIPELINE_SKIP_SPACE_CHECK", "1")
    outcomes = []
    for free_kb in FREE_KB:
        run = small_disk / f"run{free_kb}"
        for folder in before:
            shutil.copytree(reference / folder, run / ("distill" if folder == "interrupted" else folder),
                            copy_function=shutil.copy2)
        prior = outputs(run, written)
        fill(small_disk, free_kb)
        result = invoke(*command(stage, run, dataset, teacher_dir))
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        outcomes.append((free_kb, result.exit_code))
        assert "Traceback" not in result.output, (free_kb, result.output)
        assert result.exit_code == 0 or (result.exit_code == 2 and len(errors) == 1 and "free" in errors[0]), \
            (free_kb, result.output)
        os.unlink(small_disk / "filler")
        if checked and result.exit_code == 2:
            assert "needs" in errors[0], errors  # refused before work: the need and what is free
            if outputs(run, written) == prior and free_kb != FREE_KB[0]:
                shutil.rmtree(run)
                continue  # refused before writing anything: the first size's re-run stands for it
        result = invoke(*command(stage, run, dataset, teacher_dir))
        assert result.exit_code == 0, (free_kb, result.output)
        assert outputs(run, written) == expected, free_kb
        shutil.rmtree(run)
    print(stage, "checked" if checked else "unchecked", outcomes)


def test_webp_pixel_cache_on_a_full_disk(small_disk, reference, dataset, teacher_dir, tmp_path, monkeypatch):
    """The webp form writes its blocks as part files: a full disk at any of them (or at the marker
    that names their settings) is one line, and the re-run joins the same pixels.h5."""
    webp = (*DISTILL, "--pixel-cache", "webp")
    undisturbed = tmp_path / "webp"
    for folder in ("extract", "features", "align"):
        shutil.copytree(reference / folder, undisturbed / folder, copy_function=shutil.copy2)
    assert invoke(webp[0], "--run", undisturbed, *webp[1:]).exit_code == 0
    expected = outputs(undisturbed, ("pixels",))
    monkeypatch.setenv("PIPELINE_SKIP_SPACE_CHECK", "1")
    for free_kb in (0, 8, 40, 100):
        run = small_disk / f"run{free_kb}"
        for folder in ("extract", "features", "align"):
            shutil.copytree(reference / folder, run / folder, copy_function=shutil.copy2)
        fill(small_disk, free_kb)
        result = invoke(webp[0], "--run", run, *webp[1:])
        assert result.exit_code == 2 and "Traceback" not in result.output and "free on" in result.output, \
            (free_kb, result.output)
        os.unlink(small_disk / "filler")
        result = invoke(webp[0], "--run", run, *webp[1:])
        assert result.exit_code == 0, (free_kb, result.output)
        assert outputs(run, ("pixels",)) == expected, free_kb
        shutil.rmtree(run)
