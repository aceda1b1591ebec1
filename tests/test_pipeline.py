"""The stages end to end through the command line, on a tiny teacher and generated images."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from cache.fingerprint import sha256_file, sha256_json
from conftest import ALIGN, DISTILL, invoke, write_tiny_teacher


def test_extract_records_teacher_views_and_dataset(extracted, teacher_dir, dataset):
    with h5py.File(extracted / "extract" / "teacher.h5", "r") as f:
        attrs = dict(f.attrs)
        emb = f["image_emb"][()]
        assert f["status"][()].min() == 1  # every row done
        assert f["text_emb"].shape == (5, 1, 32) and f["classifier"].shape == (5, 32)
        assert f["view_params"].shape == (80, 3, 14)
    assert emb.shape == (80, 3, 32) and emb.dtype == np.float16
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=-1), 1, atol=2e-3)
    assert attrs["teacher"] == f"local-dir:{teacher_dir}"
    files = {p.name: sha256_file(p) for p in sorted(teacher_dir.iterdir())}
    assert attrs["checkpoint_sha256"] == sha256_json(files)
    assert attrs["views"] == 3 and attrs["view_seed"] == 0
    assert attrs["templates"] == 'json:["a photo of a {}"]'  # VL2V's exact prompt, no period
    assert attrs["format_version"] == 1
    info = json.loads(invoke("info", "--run", extracted, "--json").output)
    assert info["cache"]["teacher"] == attrs["teacher"]
    assert info["dataset"]["images"] == 80 and info["dataset"]["skipped"] == 0
    assert all(s["state"] == "fresh" for s in info["stages"])


def test_rerun_is_skipped_when_fresh(run_copy, teacher_dir, dataset):
    before = (run_copy / "extract" / "manifest.json").read_text()
    result = invoke("extract", "--data", dataset, "--run", run_copy, "--teacher", f"local-dir:{teacher_dir}",
                    "--views", 3, "--workers", 0)
    assert result.exit_code == 0 and "up to date" in result.output
    assert (run_copy / "extract" / "manifest.json").read_text() == before


def test_another_teacher_is_cached_beside_and_the_first_kept(run_copy, tmp_path, dataset):
    other = write_tiny_teacher(tmp_path / "other", seed=2)
    store = run_copy / "extract" / "teacher.h5"
    digest = sha256_file(store)
    result = invoke("extract", "--data", dataset, "--run", run_copy, "--teacher", f"local-dir:{other}",
                    "--views", 3, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert (run_copy / "extract" / "teachers" / "other" / "teacher.h5").exists()
    assert sha256_file(store) == digest


@pytest.mark.parametrize("method", ["adip", "erm", "kd", "rise", "probe"])
def test_methods_train_and_evaluate_without_the_teacher(method, run_copy, teacher_dir, tmp_path, monkeypatch):
    import open_clip
    hidden = tmp_path / "hidden"
    shutil.move(str(teacher_dir), hidden)  # the teacher's checkpoint is gone
    for name in ("create_model_and_transforms", "create_model"):
        monkeypatch.setattr(open_clip, name, lambda *a, **k: pytest.fail(f"{method} loaded the teacher"))
    student = ("--student", "test_resnet", "--student-weights", "none", "--student-size", 32)
    try:
        if method == "adip":
            result = invoke("align", "--run", run_copy, "--holdout", "sketch", *ALIGN)
            assert result.exit_code == 0, result.output
            student = ()
        result = invoke("distill", "--run", run_copy, "--method", method, "--holdout", "sketch", *student, *DISTILL)
        assert result.exit_code == 0, result.output
        models = ["best", "swad"] if method == "adip" else ["best"]
        for model in models:
            result = invoke("evaluate", "--run", run_copy, "--method", method, "--holdout", "sketch",
                            "--model", model, "--workers", 0)
            assert result.exit_code == 0, result.output
    finally:
        shutil.move(str(hidden), teacher_dir)
    records = [json.loads(line) for line in (run_copy / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["model"]) for r in records] == [(method, m) for m in models]
    record = records[0]
    assert record["holdout"] == "sketch" and record["seed"] == 0
    assert set(record["accuracy"]) == {"cartoon", "photo", "pixel", "sketch"}
    assert record["split"]["sketch"] == "train" and record["split"]["photo"] == "val"
    assert record["images"]["sketch"] == 16 and record["images"]["photo"] == 4
    assert 0.0 <= record["holdout_acc"] <= 1.0
    assert record["student_weights"] == (None if method == "probe" else "none")  # the weights loaded
    key = "teacher" if method == "probe" else "test_resnet_none_32px"
    for model in models:
        assert (run_copy / "distill" / method / key / "sketch" / "seed0" / f"{model}.safetensors").exists()


def test_sd_starts_from_the_teachers_own_image_tower(run_copy, teacher_dir, monkeypatch):
    import open_clip
    from safetensors.torch import load_file
    calls = []
    real = open_clip.create_model_and_transforms
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: calls.append(a) or real(*a, **k))
    result = invoke("distill", "--run", run_copy, "--method", "sd", "--holdout", "photo", "--no-swad",
                    "--lr", "0", *DISTILL)
    assert result.exit_code == 0, result.output
    assert calls and calls[0][0] == f"local-dir:{teacher_dir}"
    trained = load_file(run_copy / "distill" / "sd" / "teacher-image-tower" / "photo" / "seed0" / "best.safetensors")
    teacher = load_file(teacher_dir / "open_clip_model.safetensors")
    tower = {k[len("visual."):]: v for k, v in teacher.items() if k.startswith("visual.")}
    assert tower  # lr 0: the student is still exactly the teacher's image tower
    assert all(torch.equal(trained["backbone." + k], v) for k, v in tower.items())
    result = invoke("evaluate", "--run", run_copy, "--method", "sd", "--holdout", "photo", "--workers", 0)
    assert result.exit_code == 0, result.output
    zeroshot = invoke("evaluate", "--run", run_copy, "--method", "zeroshot", "--holdout", "photo")
    # the untrained tower reproduces the cached teacher's zero-shot accuracy, up to float16 rounding
    assert json.loads(result.output)["holdout_acc"] == pytest.approx(json.loads(zeroshot.output)["holdout_acc"], abs=0.07)


def test_stages_skip_when_fresh_and_recompute_when_stale(run_copy):
    assert invoke("align", "--run", run_copy, "--holdout", "photo", *ALIGN).exit_code == 0
    assert invoke("distill", "--run", run_copy, "--holdout", "photo", *DISTILL).exit_code == 0
    align_dir = run_copy / "align" / "test_resnet_none_32px" / "photo"
    stamp = (align_dir / "manifest.json").read_text()

    result = invoke("align", "--run", run_copy, "--holdout", "photo", *ALIGN)
    assert "up to date" in result.output and (align_dir / "manifest.json").read_text() == stamp
    assert "up to date" in invoke("distill", "--run", run_copy, "--holdout", "photo", *DISTILL).output

    result = invoke("align", "--run", run_copy, "--holdout", "photo", *ALIGN, "--lr", "1e-3")  # a new projection
    assert "up to date" not in result.output and "best source-val" in result.output
    info = json.loads(invoke("info", "--run", run_copy, "--json").output)
    states = {s["stage"]: s["state"] for s in info["stages"]}
    assert states["distill/adip/test_resnet_none_32px/photo/seed0"] == "stale"
    assert states["align/test_resnet_none_32px/photo"] == "fresh"
    result = invoke("distill", "--run", run_copy, "--holdout", "photo", *DISTILL)
    assert "up to date" not in result.output and "best source-val" in result.output
    assert "up to date" not in invoke("distill", "--run", run_copy, "--holdout", "photo", *DISTILL,
                                      "--force").output


def test_changed_dataset_is_refused_until_forced(run_copy, teacher_dir, dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data, copy_function=shutil.copy2)
    extract = ("extract", "--data", data, "--run", run_copy, "--teacher", f"local-dir:{teacher_dir}",
               "--views", 3, "--workers", 0)
    # Same images, new location: copy2 keeps mtimes, so the fingerprint matches.
    assert "up to date" in invoke(*extract).output
    next(data.glob("photo/circle/*.png")).unlink()
    result = invoke(*extract)
    assert result.exit_code == 2 and "dataset_fingerprint" in result.output
    result = invoke(*extract, "--force")
    assert result.exit_code == 0, result.output
    with h5py.File(run_copy / "extract" / "teacher.h5", "r") as f:
        assert f["image_emb"].shape[0] == 79


@pytest.mark.parametrize("args, message", [
    (("extract", "--data", "/no/such/folder", "--run", "{tmp}/r"), "dataset folder not found"),
    (("extract", "--data", "{empty}", "--run", "{tmp}/r"), "no images found"),
    (("extract", "--data", "{data}", "--run", "{tmp}/r", "--teacher", "No-Such-Model", "--pretrained", "none"),
     "cannot load teacher"),
    (("align", "--run", "{run}", "--holdout", "moon", *ALIGN), "held-out domain 'moon' is not in this dataset"),
    (("align", "--run", "{run}", "--holdout", "photo", "--student", "no_such_net", "--student-weights", "none"),
     "unknown student model"),
    (("align", "--run", "{run}", "--holdout", "photo", "--student", "test_resnet", "--student-weights", "/no/file"),
     "student weights must be"),
    (("align", "--run", "{run}", "--holdout", "photo", "--steps", "-3"), "must be a positive integer"),
    (("distill", "--run", "{run}", "--holdout", "photo", "--method", "magic"), "'magic' is not one of"),
    (("distill", "--run", "{run}", "--holdout", "photo"), "no finished alignment"),
    (("distill", "--run", "{run}", "--holdout", "photo", "--method", "erm", "--cutmix", "2"), "--cutmix is a probability"),
    (("evaluate", "--run", "{run}", "--holdout", "photo", "--method", "kd"), "no trained kd model"),
    (("run", "--run", "{run}", "--methods", "adip,nope"), "unknown method(s) nope"),
    (("run", "--run", "{run}", "--seeds", "a,b"), "--seeds must be comma-separated integers"),
    (("evaluate", "--run", "{tmp}/nothing", "--holdout", "photo"), "no extracted cache"),
])
def test_user_errors_are_one_line_with_exit_code_2(args, message, tmp_path, run_copy, dataset):
    (tmp_path / "empty" / "d" / "c").mkdir(parents=True)
    values = {"tmp": tmp_path, "empty": tmp_path / "empty", "data": dataset, "run": run_copy}
    result = invoke(*[str(a).format(**values) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def test_run_prints_and_saves_the_table(tmp_path, teacher_dir, dataset):
    run = tmp_path / "run"
    result = invoke("run", "--data", dataset, "--run", run, "--teacher", f"local-dir:{teacher_dir}",
                    "--pretrained", "none", "--student", "test_resnet", "--student-weights", "none",
                    "--student-size", 32, "--views", 2, "--steps", 2, "--align-steps", 10,
                    "--per-domain", 2, "--holdouts", "photo,sketch", "--workers", 0, "--methods", "zeroshot,adip")
    assert result.exit_code == 0, result.output
    table = (run / "table.md").read_text()
    assert table in result.output
    assert table.splitlines()[0] == "| method | photo | sketch | average |"
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("| ")]
    assert rows == ["zeroshot", "adip", "adip +SWAD"]
    assert "official online-teacher code would use" in table
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["model"], r["holdout"]) for r in results) == [
        ("adip", "best", "photo"), ("adip", "best", "sketch"), ("adip", "swad", "photo"),
        ("adip", "swad", "sketch"), ("zeroshot", "cache", "photo"), ("zeroshot", "cache", "sketch")]
    again = invoke("run", "--data", dataset, "--run", run, "--teacher", f"local-dir:{teacher_dir}",
                   "--pretrained", "none", "--student", "test_resnet", "--student-weights", "none",
                   "--student-size", 32, "--views", 2, "--steps", 2, "--align-steps", 10,
                   "--per-domain", 2, "--holdouts", "photo,sketch", "--workers", 0, "--methods", "zeroshot,adip")
    assert again.exit_code == 0 and again.output.count("up to date") >= 5
    assert len((run / "results.jsonl").read_text().splitlines()) == 6  # nothing re-evaluated


def test_zeroshot_matches_cached_embeddings(run_copy):
    result = invoke("evaluate", "--run", run_copy, "--method", "zeroshot", "--holdout", "cartoon")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    from cache.index import read_table
    columns, _ = read_table(run_copy / "extract" / "index.parquet")
    with h5py.File(run_copy / "extract" / "teacher.h5", "r") as f:
        emb, classifier = f["image_emb"][:, 0].astype(np.float32), f["classifier"][()].astype(np.float32)
    predicted = (emb @ classifier.T).argmax(1)
    rows = [i for i, (d, s) in enumerate(zip(columns["domain"], columns["split"])) if d == "cartoon" and s == "train"]
    expected = float(np.mean(predicted[rows] == np.array(columns["label"])[rows]))
    assert record["holdout_acc"] == pytest.approx(expected)


def test_preset_carries_the_official_numbers_and_sweeps_rise_weights(tmp_path, teacher_dir, dataset):
    run = tmp_path / "run"
    result = invoke("run", "--data", dataset, "--run", run, "--teacher", f"local-dir:{teacher_dir}",
                    "--pretrained", "none", "--student", "test_resnet", "--student-weights", "none",
                    "--student-size", 32, "--views", 2, "--steps", 2, "--eval-every", 1, "--per-domain", 2,
                    "--holdouts", "sketch", "--workers", 0, "--methods", "rise", "--preset", "terraincognita")
    assert result.exit_code == 0, result.output
    protocol = json.loads((run / "protocol.json").read_text())
    settings = protocol["settings"]
    assert settings["preset"] == "terraincognita" and settings["align_steps"] == 5001  # preset value
    assert settings["steps"] == 2 and settings["eval_every"] == 1                      # explicit options win
    rise = settings["methods"]["rise"]
    assert rise["hparams"] == {"lr": 2e-3} and rise["anchors"] == "generic"
    assert [tuple(p.values()) for p in rise["grid"]] == [(0.2, 0.8, 0.5), (0.3, 0.7, 0.5), (0.2, 0.8, 1.0),
                                                         (0.3, 0.7, 1.0), (0.2, 0.8, 2.0), (0.3, 0.7, 2.0)]
    assert '"preset": "terraincognita"' in result.output  # the printed settings
    [sweep] = protocol["sweeps"]
    accs = [c["best_source_val_acc"] for c in sweep["candidates"]]
    assert len(accs) == 6
    assert sweep["selected"] == sweep["candidates"][accs.index(max(accs))]["hparams"]  # first best on ties
    [record] = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert record["hparams"] == {"lr": 2e-3, **sweep["selected"]}
    assert "selected" in result.output
    for c in sweep["candidates"]:
        trained = json.loads((run / "distill" / "rise" / "test_resnet_none_32px" / "sketch" /
                              f"seed0-{c['variant']}" / "config.json").read_text())
        assert trained["anchors"] == "generic" and trained["hparams"] == {"lr": 2e-3, **c["hparams"]}
