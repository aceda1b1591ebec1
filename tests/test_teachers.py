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
