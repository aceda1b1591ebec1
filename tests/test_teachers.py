"""The teacher's own logit rule (scale and bias) recorded at extraction and used everywhere, and
hf-hub teachers fingerprinted by the commit they resolve to."""
import json
import math

import h5py
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cache.errors import UserError
from cache.teacher_cache import TeacherCache
from conftest import TINY_CLIP, invoke, write_tiny_teacher
from stages.methods import KD, RISE, ZeroShot


def _teacher_with_rule(folder, scale: float, bias: float):
    """A tiny open_clip teacher whose logit scale and bias are set (a SigLIP-style rule)."""
    from safetensors.torch import load_file, save_file
    write_tiny_teacher(folder)
    config = json.loads(json.dumps(TINY_CLIP))
    config["model_cfg"]["init_logit_bias"] = 0.0  # the model has a bias parameter
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    weights = load_file(folder / "open_clip_model.safetensors")
    weights.update(logit_scale=torch.tensor(math.log(scale)), logit_bias=torch.tensor(bias))
    save_file(weights, folder / "open_clip_model.safetensors")
    return folder


def test_zero_shot_and_teacher_logits_use_the_teachers_own_scale_and_bias(tmp_path, dataset):
    teacher = _teacher_with_rule(tmp_path / "siglip-like", scale=30.0, bias=-2.5)
    run = tmp_path / "run"
    result = invoke("extract", "--data", dataset, "--run", run, "--teacher", f"local-dir:{teacher}",
                    "--views", 2, "--workers", 0, "--batch-size", 16)
    assert result.exit_code == 0, result.output
    cache = TeacherCache(run / "extract" / "teacher.h5")
    assert cache.logit_scale == pytest.approx(30.0) and cache.logit_bias == pytest.approx(-2.5)

    # open_clip's own rule, from the model itself: logit_scale.exp() * cos + logit_bias
    model = open_clip.create_model(f"local-dir:{teacher}")
    emb = cache.image_emb[:, 0].float()
    expected = (model.logit_scale.exp() * F.normalize(emb, dim=-1) @ F.normalize(cache.classifier, dim=-1).T
                + model.logit_bias).detach()
    torch.testing.assert_close(ZeroShot.logits_of(None, cache)(emb), expected, rtol=1e-5, atol=1e-4)
    # and the KD and RISE targets (every method's teacher logits) follow the same rule
    text = cache.text(cache.attrs["domains"])
    torch.testing.assert_close(KD(nn.Identity(), text, 1).teacher_logits(emb, text.classifier), expected,
                               rtol=1e-5, atol=1e-4)
    rise_expected = (30.0 * F.normalize(emb, dim=-1) @ F.normalize(text.ensemble, dim=-1).T - 2.5)
    torch.testing.assert_close(RISE(nn.Identity(), text, 1).teacher_logits(emb, text.ensemble), rise_expected,
                               rtol=1e-4, atol=1e-3)


def test_an_openai_style_teacher_reads_as_100_and_an_old_cache_defaults_to_it(extracted, tmp_path):
    from pipeline import config
    from stages.teacher import OpenClipTeacher
    assert OpenClipTeacher(config.DEMO_TEACHER).logit_scale == 100.0  # the demo teacher is set to CLIP's
    old = tmp_path / "old.h5"
    old.write_bytes((extracted / "extract" / "teacher.h5").read_bytes())
    with h5py.File(old, "r+") as f:  # a cache written before the rule was recorded
        del f.attrs["logit_scale"], f.attrs["logit_bias"]
    cache = TeacherCache(old)
    assert (cache.logit_scale, cache.logit_bias) == (100.0, 0.0)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hugging Face cache holding one open_clip repository, read offline."""
    import huggingface_hub.constants

    root = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    repo = root / "models--lab--tiny-clip"

    def publish(commit: str, seed: int):
        write_tiny_teacher(repo / "snapshots" / commit, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    return publish


def test_hf_hub_teacher_is_fingerprinted_by_its_commit_and_a_new_commit_is_refused(hub, dataset, tmp_path):
    from stages.teacher import checkpoint_fingerprint, teacher_of_cache
    first, second = "a" * 40, "b" * 40
    hub(first, seed=1)
    run = tmp_path / "run"
    result = invoke("extract", "--data", dataset, "--run", run, "--teacher", "hf-hub:lab/tiny-clip",
                    "--views", 2, "--workers", 0, "--batch-size", 16)
    assert result.exit_code == 0, result.output
    attrs = TeacherCache(run / "extract" / "teacher.h5").attrs
    assert attrs["checkpoint_sha256"] == f"hf-hub:lab/tiny-clip@{first}" and attrs["pretrained"] is None
    assert teacher_of_cache(attrs).identity["checkpoint_sha256"] == attrs["checkpoint_sha256"]

    hub(second, seed=2)  # the repository moved on: other weights under the same name
    assert checkpoint_fingerprint("hf-hub:lab/tiny-clip", None).endswith(second)
    with pytest.raises(UserError, match="checkpoint changed"):
        teacher_of_cache(attrs)
    again = invoke("extract", "--data", dataset, "--run", run, "--teacher", "hf-hub:lab/tiny-clip",
                   "--views", 2, "--workers", 0, "--batch-size", 16)
    assert again.exit_code == 2 and "checkpoint_sha256" in again.output, again.output


def test_an_hf_hub_teacher_that_cannot_be_resolved_is_one_line(hub, dataset, tmp_path):
    result = invoke("extract", "--data", dataset, "--run", tmp_path / "run", "--teacher", "hf-hub:lab/missing",
                    "--workers", 0)
    assert result.exit_code == 2 and "cannot resolve teacher hf-hub:lab/missing" in result.output
    assert "Traceback" not in result.output


def test_a_served_teacher_sends_its_logit_rule_and_an_older_server_reads_as_clips():
    from data.views import InputSpec
    from stages.teacher_wire import Description
    described = Description(InputSpec(32, (0.5,) * 3, (0.25,) * 3), 32, "v1", logit_scale=30.0, logit_bias=-2.5)
    received = Description.from_metadata(described.metadata({"name": "teacher"}))
    assert (received.logit_scale, received.logit_bias) == (30.0, -2.5)
    older = described.metadata({"name": "teacher"})
    del older["parameters"]["logit_scale"], older["parameters"]["logit_bias"]
    assert (Description.from_metadata(older).logit_scale, Description.from_metadata(older).logit_bias) == (100.0, 0.0)


# ---------------------------------------------------------------- several teachers, one run folder

def _extract(run, dataset, teacher, *extra):
    return invoke("extract", "--data", dataset, "--run", run, "--teacher", f"local-dir:{teacher}",
                  "--views", 3, "--workers", 0, "--batch-size", 16, *extra)


@pytest.fixture
def two_teachers(run_copy, dataset, tmp_path):
    """The extracted run folder (teacher 'tiny') with a second teacher ('other', another seed)."""
    from safetensors.torch import load_file, save_file
    other = write_tiny_teacher(tmp_path / "other", seed=2)
    weights = load_file(other / "open_clip_model.safetensors")  # and its own logit scale
    save_file({**weights, "logit_scale": torch.tensor(math.log(30.0))}, other / "open_clip_model.safetensors")
    first = (run_copy / "extract" / "teacher.h5").read_bytes()
    result = _extract(run_copy, dataset, other)
    assert result.exit_code == 0, result.output
    assert "cached beside tiny" in result.output
    assert (run_copy / "extract" / "teacher.h5").read_bytes() == first  # the first teacher's cache is kept
    return run_copy, other


def test_each_teachers_cache_is_resumed_and_stale_checked_on_its_own(two_teachers, dataset, teacher_dir):
    from cache import store
    run, other = two_teachers
    second = run / "extract" / "teachers" / "other" / "teacher.h5"
    assert _extract(run, dataset, other).output.count("up to date") == 1
    assert "up to date" in _extract(run, dataset, teacher_dir).output
    with store.Rows(second) as rows:  # a block of the second teacher's lost: only it is recomputed
        rows.mark_pending([range(0, 16)])
        rows.sync()
    before = (run / "extract" / "teacher.h5").read_bytes()
    redo = _extract(run, dataset, other)
    assert redo.exit_code == 0 and "1 blocks to compute" in redo.output, redo.output
    assert "up to date" in _extract(run, dataset, teacher_dir).output
    assert (run / "extract" / "teacher.h5").read_bytes() == before


def test_ensemble_targets_are_the_mean_of_the_normalised_embeddings_renormalised(two_teachers):
    from stages.runfolder import RunFolder
    run, _ = two_teachers
    with h5py.File(run / "extract" / "teacher.h5") as a, \
            h5py.File(run / "extract" / "teachers" / "other" / "teacher.h5") as b:
        def independent(name):
            x, y = (torch.from_numpy(f[name][()]).double() for f in (a, b))
            mean = x / x.norm(dim=-1, keepdim=True) + y / y.norm(dim=-1, keepdim=True)
            return (mean / mean.norm(dim=-1, keepdim=True)).float()
        expected = {name: independent(name) for name in ("image_emb", "classifier", "rise_classifier")}
    mixed = RunFolder(run).using(["tiny", "other"]).load_teacher()
    torch.testing.assert_close(mixed.image_emb.float(), expected["image_emb"], atol=1e-3, rtol=0)  # stored fp16
    torch.testing.assert_close(mixed.classifier, expected["classifier"], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.ensemble, expected["rise_classifier"], atol=1e-5, rtol=0)
    assert mixed.logit_scale == pytest.approx((100 / 7 + 30) / 2, abs=1e-4)  # open_clip's initial 1/0.07, and 30


def test_distill_and_evaluate_against_an_ensemble(two_teachers):
    from conftest import DISTILL
    run, _ = two_teachers
    trained = invoke("distill", "--run", run, "--method", "kd", "--holdout", "sketch", "--student", "test_resnet",
                     "--student-weights", "none", "--student-size", 32, "--teachers", "other,tiny", *DISTILL)
    assert trained.exit_code == 0, trained.output
    assert (run / "with" / "other+tiny" / "distill" / "kd").is_dir()
    scored = invoke("evaluate", "--run", run, "--method", "kd", "--holdout", "sketch", "--teachers", "tiny,other")
    assert scored.exit_code == 0, scored.output
    row = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()][-1]
    assert row["teachers"] == "other+tiny" and row["teacher"] == "ensemble:other+tiny"
    # the first teacher alone is the default, and names nothing
    alone = invoke("evaluate", "--run", run, "--method", "zeroshot", "--holdout", "sketch", "--teachers", "tiny")
    assert alone.exit_code == 0 and "teachers" not in json.loads((run / "results.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("teachers, says", [("tiny,nobody", "no teacher 'nobody' is extracted"),
                                            ("tiny,tiny", "more than once")])
def test_unknown_or_repeated_teachers_are_one_line(two_teachers, teachers, says):
    run, _ = two_teachers
    result = invoke("evaluate", "--run", run, "--method", "zeroshot", "--holdout", "sketch", "--teachers", teachers)
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output


def test_teachers_that_saw_other_views_are_not_ensembled_and_sd_needs_one_teacher(run_copy, dataset, tmp_path):
    other = write_tiny_teacher(tmp_path / "other", seed=2)
    assert _extract(run_copy, dataset, other, "--view-seed", 5).exit_code == 0
    result = invoke("evaluate", "--run", run_copy, "--method", "zeroshot", "--holdout", "sketch",
                    "--teachers", "tiny,other")
    assert result.exit_code == 2 and "cannot be ensembled" in result.output and "view_seed" in result.output
    from stages.teacher import teacher_of_cache
    with pytest.raises(UserError, match="not an ensemble"):
        teacher_of_cache({"teacher": "ensemble:a+b"})


def test_run_with_two_teachers_trains_against_their_ensemble_and_scores_each(dataset, teacher_dir, tmp_path):
    other = write_tiny_teacher(tmp_path / "other", seed=2)
    run = tmp_path / "run"
    args = ("run", "--data", dataset, "--run", run, "--teachers", f"local-dir:{teacher_dir},local-dir:{other}",
            "--student", "test_resnet", "--student-weights", "none", "--student-size", 32, "--views", 2,
            "--steps", 2, "--align-steps", 4, "--eval-every", 2, "--per-domain", 2, "--holdouts", "sketch",
            "--workers", 0, "--methods", "zeroshot,adip")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    table = (run / "table.md").read_text()
    for row in ("| zeroshot [other+tiny] |", "| adip [other+tiny] |", "| adip +SWAD [other+tiny] |",
                "| zeroshot |", "| zeroshot [other] |"):
        assert row in table, table
    assert (run / "with" / "other+tiny" / "align").is_dir() and (run / "extract" / "teachers" / "other").is_dir()
    rows = len((run / "results.jsonl").read_text().splitlines())
    again = invoke(*args)
    assert again.exit_code == 0 and len((run / "results.jsonl").read_text().splitlines()) == rows
    both = invoke("run", "--data", dataset, "--run", run, "--teacher", "x", "--teachers", "y,z")
    assert both.exit_code == 2 and "not both" in both.output


def test_info_names_every_teacher(two_teachers):
    run, _ = two_teachers
    result = invoke("info", "--run", run)
    assert result.exit_code == 0 and "also:       other:" in result.output and "logits 14.2857 x cos + 0" in result.output
    report = json.loads(invoke("info", "--run", run, "--json").output)
    assert list(report["teachers"]) == ["tiny", "other"] and report["teachers"]["other"]["logit_scale"] == 30.0


def test_run_knows_the_demo_teachers_by_name_and_takes_a_tag_after_at():
    from pathlib import Path
    from pipeline.protocol import teacher_and_tag
    second = teacher_and_tag("demo_teacher_2", None)["teacher"]
    assert second.startswith("local-dir:") and (Path(second[len("local-dir:"):]) / "open_clip_model.safetensors").exists()
    assert teacher_and_tag("ViT-B-16@openai", None) == {"teacher": "ViT-B-16", "pretrained": "openai"}
    assert teacher_and_tag("https://host:8080/v2/models/a@b", "x")["teacher"] == "https://host:8080/v2/models/a@b"
